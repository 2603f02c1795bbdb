"""Review: the correction queue (Redis, leased claims), submitting a correction, and a model's suggestion.

The queue in Redis is the one source of truth for who holds a case; every review surface (the CLI today)
claims, renews and submits through `CorrectionQueue`.
"""

from streams.review.queue import Claim, ClaimLost, CorrectionQueue, QueueStats
from streams.review.submit import submit_correction

__all__ = ["Claim", "ClaimLost", "CorrectionQueue", "QueueStats", "submit_correction"]
