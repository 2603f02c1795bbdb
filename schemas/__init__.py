"""The contracts of vlmflow: one frozen pydantic model per topic value, the topic registry, settings, error codes.

This package imports nothing else of vlmflow, so producers and consumers in any service can depend on it alone.
"""

from schemas.base import SCHEMA_VERSION, Message
from schemas.cases import Correction, GoldenRecord, HardCase, Signal
from schemas.codec import decode, encode
from schemas.errors import ERROR_CODES, ErrorCode, InvalidLog, InvalidMessage, VlmflowError
from schemas.jobs import ImageJob, JobError, JobResult, RetryJob, Task, Timings
from schemas.logs import ImageInfo, Lineage, NormalizedLog, RejectedLog
from schemas.settings import Settings, load_settings
from schemas.topics import TOPICS, TopicSpec, topic

__all__ = [
    "ERROR_CODES",
    "SCHEMA_VERSION",
    "TOPICS",
    "Correction",
    "ErrorCode",
    "GoldenRecord",
    "HardCase",
    "ImageInfo",
    "ImageJob",
    "InvalidLog",
    "InvalidMessage",
    "JobError",
    "JobResult",
    "Lineage",
    "Message",
    "NormalizedLog",
    "RejectedLog",
    "RetryJob",
    "Settings",
    "Signal",
    "Task",
    "Timings",
    "TopicSpec",
    "VlmflowError",
    "decode",
    "encode",
    "load_settings",
    "topic",
]
