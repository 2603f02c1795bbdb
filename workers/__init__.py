"""Inference workers: token estimation, the shared budget, image loading, engines and the serving loop."""
