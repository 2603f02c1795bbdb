"""The flywheel streams (Faust), the correction queue, golden set, dataset export, replay and offset tools."""
