"""The S3 store as the command line and the local stack use it: a client and the configured buckets."""

from __future__ import annotations

from minio import Minio

from schemas.settings import Settings


def object_store(settings: Settings) -> Minio:
    return Minio(**settings.s3.client_kwargs())  # type: ignore[arg-type]


def ensure_buckets(settings: Settings) -> list[str]:
    """Create the image and dataset buckets that do not exist yet; returns those created."""
    client = object_store(settings)
    created = []
    for bucket in [*settings.s3.image_buckets, settings.s3.dataset_bucket]:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            created.append(bucket)
    return created
