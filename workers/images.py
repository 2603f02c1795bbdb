"""Images of a job, from their URI to RGB pixels, with every failure turned into a stable error code.

A job names images as `s3://bucket/key` (configured buckets only), inline `data:image/...;base64,` URIs (size
limited) or `http(s)://` URLs from an allow-list. Where an image comes from is decided by pure functions
(`image_source`, `decode_image`); the fetching is the only I/O and runs in threads, since the S3 client blocks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error
from PIL import Image, ImageOps, UnidentifiedImageError
from urllib3.exceptions import HTTPError as Urllib3Error

from schemas.errors import ErrorCode, VlmflowError
from schemas.settings import Settings

SourceKind = Literal["s3", "inline", "url"]
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""What Pillow may try to decode (JPEG includes the MPO files many phone cameras write)."""
URL_TIMEOUT_S = 10.0
_NOT_FOUND_S3_CODES = ("NoSuchKey", "NoSuchBucket", "NoSuchObject")


class ImageError(VlmflowError):
    """An image of a job that cannot be served; `code` goes into the job's error result."""

    def __init__(self, code: ErrorCode, message: str):
        self.code: ErrorCode = code
        super().__init__(message)


@dataclass(frozen=True)
class ImageSource:
    """Where one image comes from, checked against the configuration but not fetched yet."""

    kind: SourceKind
    uri: str
    bucket: str = ""
    key: str = ""
    inline_bytes: bytes = b""
    """The decoded payload of a `data:` URI; empty for the other kinds."""


@dataclass(frozen=True)
class LoadedImage:
    uri: str
    """The job's URI; inline ones are shortened to their media type, so logs do not carry the payload."""
    image: Image.Image
    """RGB, turned as its EXIF orientation says, at its original resolution."""

    @property
    def size(self) -> tuple[int, int]:
        """`(width, height)` after the EXIF turn: what the model sees before resizing."""
        return self.image.size


def _shown(uri: str) -> str:
    return uri.split(",", 1)[0] + ",..." if uri.startswith("data:") else uri


def image_source(uri: str, settings: Settings) -> ImageSource:
    """Classify `uri` and check it against the configured buckets, URL allow-list and inline size limit."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ImageError("image_not_found", f"{uri}: an s3:// URI needs a bucket and a key")
        if bucket not in settings.s3.image_buckets:
            allowed = ", ".join(settings.s3.image_buckets) or "none"
            raise ImageError("bucket_forbidden", f"{uri}: bucket {bucket!r} is not an image bucket ({allowed})")
        return ImageSource("s3", uri, bucket=bucket, key=key)
    if uri.startswith("data:"):
        return ImageSource(
            "inline", _shown(uri), inline_bytes=_inline_bytes(uri, settings.worker.max_inline_image_bytes)
        )
    if uri.startswith(("http://", "https://")):
        host = urlsplit(uri).hostname or ""
        if host not in settings.worker.url_allow_list:
            raise ImageError("url_forbidden", f"{uri}: host {host!r} is not in the URL allow-list")
        return ImageSource("url", uri)
    raise ImageError("image_not_found", f"{uri[:60]!r} is not an s3://, data: or http(s):// URI")


def _inline_bytes(uri: str, max_bytes: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError("image_undecodable", f"{_shown(uri)}: an inline image must be a base64 data: URI")
    # NOTE: base64 grows data by 4/3, so the text length bounds the payload before anything is decoded.
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError("payload_too_large", f"{_shown(uri)}: inline image over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageError("image_undecodable", f"{_shown(uri)}: invalid base64 ({exc})") from None


def decode_image(data: bytes, *, uri: str, max_pixels: int) -> Image.Image:
    """Decode `data` into an RGB image turned upright by its EXIF orientation.

    The pixel count is checked from the header before any pixel is decoded (decompression bombs). A header
    that parses followed by pixel data that does not is `image_truncated`; no header is `image_undecodable`.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", f"{uri}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_undecodable", f"{uri}: not an image Pillow can read ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{uri}: {width}x{height} is over the limit of {max_pixels} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("image_truncated", f"{uri}: the pixel data is cut short or corrupt ({exc})") from None
    upright = ImageOps.exif_transpose(image)
    return _rgb(upright)


def _rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white rather than whatever colour their hidden channels hold."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _fetch_s3(store: Minio, source: ImageSource, max_bytes: int) -> bytes:
    response = None
    try:
        response = store.get_object(source.bucket, source.key)
        data = response.read(max_bytes + 1)
    except S3Error as exc:
        if exc.code in _NOT_FOUND_S3_CODES:
            raise ImageError("image_not_found", f"{source.uri}: no such object") from None
        if exc.code == "AccessDenied":
            raise ImageError("bucket_forbidden", f"{source.uri}: the store denied access") from None
        raise ImageError("image_fetch_failed", f"{source.uri}: S3 error {exc.code}") from None
    except (Urllib3Error, OSError) as exc:
        raise ImageError("image_fetch_failed", f"{source.uri}: {type(exc).__name__}: {exc}") from None
    finally:
        if response is not None:
            response.close()
            response.release_conn()
    if len(data) > max_bytes:
        raise ImageError("payload_too_large", f"{source.uri}: object over {max_bytes} bytes")
    return data


def _fetch_url(source: ImageSource, max_bytes: int) -> bytes:
    request = urllib.request.Request(source.uri, headers={"User-Agent": "vlmflow-worker"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        code: ErrorCode = "image_not_found" if exc.code in (404, 410) else "image_fetch_failed"
        raise ImageError(code, f"{source.uri}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ImageError("image_fetch_failed", f"{source.uri}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError("payload_too_large", f"{source.uri}: response over {max_bytes} bytes")
    return data


def fetch_bytes(source: ImageSource, settings: Settings, store: Minio) -> bytes:
    """The encoded image (blocking: call it in a thread)."""
    if source.kind == "inline":
        return source.inline_bytes
    if source.kind == "s3":
        return _fetch_s3(store, source, settings.worker.max_image_bytes)
    return _fetch_url(source, settings.worker.max_image_bytes)


def load_image(uri: str, settings: Settings, store: Minio) -> LoadedImage:
    """Check, fetch and decode one image (blocking: call it in a thread)."""
    source = image_source(uri, settings)
    data = fetch_bytes(source, settings, store)
    return LoadedImage(source.uri, decode_image(data, uri=source.uri, max_pixels=settings.worker.max_image_pixels))


async def load_images(uris: Sequence[str], settings: Settings, store: Minio) -> list[LoadedImage]:
    """Every image of a job, fetched and decoded in parallel; the first failing one (in job order) raises."""
    results = await asyncio.gather(
        *(asyncio.to_thread(load_image, uri, settings, store) for uri in uris), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [result for result in results if isinstance(result, LoadedImage)]
