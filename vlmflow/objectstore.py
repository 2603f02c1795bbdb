"""The S3 store as the command line and the local stack use it: a client and the configured buckets."""

from __future__ import annotations

import hashlib
import io

from schemas.connections import object_store
from schemas.settings import Settings


def ensure_buckets(settings: Settings) -> list[str]:
    """Create the image and dataset buckets that do not exist yet; returns those created."""
    client = object_store(settings)
    created = []
    for bucket in [*settings.s3.image_buckets, settings.s3.dataset_bucket]:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            created.append(bucket)
    return created


def put_image(settings: Settings, data: bytes, suffix: str) -> str:
    """Store an encoded image in the first image bucket under a content-addressed key; returns its s3:// URI."""
    bucket = settings.s3.image_buckets[0]
    key = f"uploads/{hashlib.sha256(data).hexdigest()[:32]}{suffix.lower()}"
    object_store(settings).put_object(bucket, key, io.BytesIO(data), len(data))
    return f"s3://{bucket}/{key}"
