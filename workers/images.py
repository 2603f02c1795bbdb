"""Images of a job, from their URI to the pixels the model sees, with every failure turned into a stable error code.

Sources. A job names images as `s3://bucket/key` (configured buckets only), inline `data:image/...;base64,` URIs
(size limited) or `http(s)://` URLs from an allow-list. `image_source` decides where an image comes from, purely:

- an `s3://` key must be a plain relative path: no empty, `.` or `..` segment, no backslash, no control character
  (an object-store client or proxy that normalizes `vlm-images/../x` reads another bucket);
- a URL must be exactly `scheme://host[:port]/path`: no user info, no backslash or whitespace, no dot segment
  (plain or percent-encoded), and host and port must be allow-listed: an entry `host` allows the scheme's own
  port (80 or 443), an entry `host:port` that port. Redirects are followed (at most `MAX_REDIRECTS`) only to URLs
  that pass the same check, hop by hop, before any connection is made to them.

A URI that is malformed or ambiguous is `invalid_image_uri`; a well-formed one outside the configuration is
`bucket_forbidden` or `url_forbidden`. All of them are the job's fault and answered at once, never retried.

Preparation. `prepare_image` turns encoded bytes into what the engine gets: decoded (the pixel count checked from
the header first), RGB (transparent pixels white), resized to exactly the model's `smart_resize` grid at the
engine's `min_pixels`/`max_pixels` (`workers.tokens.resized_size`, bicubic, as the processor resamples) and turned
upright by its EXIF orientation. So the engine's processor finds every image already at its final size and does no
second resample, and the vision tokens counted from the original size are the engine's own count. A JPEG is
decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least the final size (Pillow's `draft`), which for a
12 MP photo is a quarter of the pixels and of the CPU time (`python bench/bench_images.py`).

Resources. Fetching is I/O and runs in threads. Preparation is CPU work and runs in a bounded pool of threads
(`worker.image_threads`; Pillow releases the GIL while it decodes and resamples), so the event loop with its
heartbeats and lease renewals never waits on pixels. A `PixelBudget` bounds the decoded source pixels held at once
across all images being prepared (`worker.image_pixel_budget`): a thread waits, first come first served, until its
image fits. After preparation an image holds at most `model.max_pixels` pixels.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache, partial
from http.client import HTTPMessage
from typing import IO, Literal
from urllib.parse import unquote, urlsplit

from minio import Minio
from minio.error import S3Error
from PIL import ExifTags, Image, UnidentifiedImageError
from urllib3.exceptions import HTTPError as Urllib3Error

from schemas.errors import ErrorCode, VlmflowError
from schemas.settings import Settings
from workers.tokens import MAX_ASPECT_RATIO, resized_size

SourceKind = Literal["s3", "inline", "url"]
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""What Pillow may try to decode (JPEG includes the MPO files many phone cameras write)."""
URL_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
MAX_S3_KEY_BYTES = 1024
"""S3's own limit on a key's length."""
DEFAULT_PORTS = {"http": 80, "https": 443}
_NOT_FOUND_S3_CODES = ("NoSuchKey", "NoSuchBucket", "NoSuchObject")
_UNSAFE_IN_KEY = re.compile(r"[\x00-\x1f\x7f\\]")
"""Control characters and backslashes: clients, proxies and stores disagree about them."""
_UNSAFE_IN_URL = re.compile(r"[^\x21-\x7e]|\\")
"""Anything but printable ASCII (an HTTP request line cannot carry it), and backslashes."""
_HOST = re.compile(
    r"^(?:[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\])$"
)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation → the turn that makes the image upright (as `ImageOps.exif_transpose`)."""
_SIDES_SWAPPED = (5, 6, 7, 8)


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
    """RGB, upright, at its final size: the `smart_resize` grid the engine's processor computes for `size`."""
    size: tuple[int, int]
    """`(width, height)` of the original image after the EXIF turn: what vision tokens and boxes are counted on."""


def _shown(uri: str) -> str:
    return uri.split(",", 1)[0] + ",..." if uri.startswith("data:") else uri


# -- sources -------------------------------------------------------------------------------------------------


def image_source(uri: str, settings: Settings) -> ImageSource:
    """Classify `uri` and check it against the configured buckets, URL allow-list and inline size limit."""
    if uri.startswith("s3://"):
        bucket, key = _s3_parts(uri)
        if bucket not in settings.s3.image_buckets:
            allowed = ", ".join(settings.s3.image_buckets) or "none"
            raise ImageError("bucket_forbidden", f"{uri}: bucket {bucket!r} is not an image bucket ({allowed})")
        return ImageSource("s3", uri, bucket=bucket, key=key)
    if uri.startswith("data:"):
        return ImageSource(
            "inline", _shown(uri), inline_bytes=_inline_bytes(uri, settings.worker.max_inline_image_bytes)
        )
    if uri.startswith(("http://", "https://")):
        return ImageSource("url", checked_url(uri, settings.worker.url_allow_list))
    raise ImageError("invalid_image_uri", f"{uri[:60]!r} is not an s3://, data: or http(s):// URI")


def _s3_parts(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://` URI whose key is a plain relative path."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ImageError("invalid_image_uri", f"{uri[:200]}: an s3:// URI needs a bucket and a key")
    if _UNSAFE_IN_KEY.search(uri):
        raise ImageError("invalid_image_uri", f"{uri[:200]!r}: control characters or backslashes")
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        raise ImageError("invalid_image_uri", f"{uri[:200]}...: key over {MAX_S3_KEY_BYTES} bytes")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise ImageError("invalid_image_uri", f"{uri[:200]}: empty, '.' or '..' path segment in the key")
    return bucket, key


def checked_url(uri: str, allow_list: Sequence[str]) -> str:
    """`uri` when it is a plain http(s) URL to an allow-listed host and port (see the module docstring)."""
    shown = uri[:200]
    if _UNSAFE_IN_URL.search(uri):
        raise ImageError("invalid_image_uri", f"{shown!r}: only printable ASCII without backslashes")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # NOTE: e.g. a bracketed host that is no IPv6 address
        raise ImageError("invalid_image_uri", f"{shown!r}: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ImageError("url_forbidden", f"{shown}: only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise ImageError("invalid_image_uri", f"{shown}: user info in a URL is not accepted")
    host = (parts.hostname or "").lower()
    try:
        port = DEFAULT_PORTS[parts.scheme] if parts.port is None else parts.port
    except ValueError:
        raise ImageError("invalid_image_uri", f"{shown}: the port is not a number from 0 to 65535") from None
    if not _HOST.match(f"[{host}]" if ":" in host else host):
        raise ImageError("invalid_image_uri", f"{shown}: {host!r} is not a host name or IP address")
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        raise ImageError("invalid_image_uri", f"{shown}: '.' or '..' path segment")
    if not _allowed(host, port, parts.scheme, allow_list):
        raise ImageError("url_forbidden", f"{shown}: {host}:{port} is not in the URL allow-list")
    return uri


def _allowed(host: str, port: int, scheme: str, allow_list: Sequence[str]) -> bool:
    """Whether an allow-list entry names `host` and this port (a bare `host` entry: the scheme's own port)."""
    for entry in allow_list:
        try:
            parts = urlsplit(f"//{entry.strip().lower()}")
            allowed_port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
        except ValueError:  # NOTE: an entry that is no host[:port] allows nothing
            continue
        if parts.hostname == host and allowed_port == port:
            return True
    return False


def _inline_bytes(uri: str, max_bytes: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError("image_undecodable", f"{_shown(uri)}: an inline image must be a base64 data: URI")
    # NOTE: base64 grows data by 4/3, so the text length bounds the payload before anything is decoded.
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError("payload_too_large", f"{_shown(uri)}: inline image over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:  # NOTE: binascii.Error, or a ValueError for characters outside ASCII
        raise ImageError("image_undecodable", f"{_shown(uri)}: invalid base64 ({exc})") from None


# -- fetching ------------------------------------------------------------------------------------------------


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


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that passes `checked_url`, checked before it is connected to."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, allow_list: Sequence[str]):
        self.allow_list = allow_list

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        try:
            checked_url(newurl, self.allow_list)
        except ImageError as exc:
            fp.close()
            raise ImageError(exc.code, f"{req.full_url} redirects to {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_url(source: ImageSource, max_bytes: int, allow_list: Sequence[str]) -> bytes:
    request = urllib.request.Request(source.uri, headers={"User-Agent": "vlmflow-worker"})
    opener = urllib.request.build_opener(_CheckedRedirects(allow_list))
    try:
        with opener.open(request, timeout=URL_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        code: ErrorCode = "image_not_found" if exc.code in (404, 410) else "image_fetch_failed"
        raise ImageError(code, f"{source.uri}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ImageError("image_fetch_failed", f"{source.uri}: {exc}") from None
    except ValueError as exc:
        # NOTE: http.client's own URL checks (InvalidURL) behind `checked_url`'s: the URL's fault, not the host's.
        raise ImageError("invalid_image_uri", f"{source.uri}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError("payload_too_large", f"{source.uri}: response over {max_bytes} bytes")
    return data


def fetch_bytes(source: ImageSource, settings: Settings, store: Minio) -> bytes:
    """The encoded image (blocking: call it in a thread)."""
    if source.kind == "inline":
        return source.inline_bytes
    if source.kind == "s3":
        return _fetch_s3(store, source, settings.worker.max_image_bytes)
    return _fetch_url(source, settings.worker.max_image_bytes, settings.worker.url_allow_list)


# -- preparation ---------------------------------------------------------------------------------------------


class PixelBudget:
    """Decoded pixels held at once by the threads preparing images: each waits, first come first served, until its
    image fits. An image larger than the whole budget is charged the whole budget, so it waits until it is alone.

    NOTE: threads wait here, never the event loop; a waiting thread holds no pixels, so waiting cannot deadlock.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        """The most pixels held at once so far (for tests and benchmarks)."""
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` (at most the capacity) for the body; blocks the calling thread until they fit."""
        charge = min(max(pixels, 0), self.capacity)
        ticket = object()
        with self._changed:
            self._line.append(ticket)
            self._changed.wait_for(lambda: self._line[0] is ticket and self.in_use + charge <= self.capacity)
            self._line.popleft()
            self.in_use += charge
            self.peak = max(self.peak, self.in_use)
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= charge
                self._changed.notify_all()


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation; 1 when there is none or it cannot be read (metadata never fails a job)."""
    # NOTE: hostile metadata may break Pillow's EXIF and XMP parsers in any way; the pixels still count.
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


def prepare_image(data: bytes, *, uri: str, settings: Settings, budget: PixelBudget | None = None) -> LoadedImage:
    """Decode `data` into the image the engine gets: RGB, upright, at its final `smart_resize` size (blocking and
    CPU-bound: run it in the image pool). The decoded pixels are held from `budget` while they are in memory.

    The pixel count is checked from the header before any pixel is decoded (decompression bombs). A header
    that parses followed by pixel data that does not is `image_truncated`; no header is `image_undecodable`.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", f"{uri}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_undecodable", f"{uri}: not an image Pillow can read ({type(exc).__name__})") from None
    stored = image.size
    limit = settings.worker.max_image_pixels
    if stored[0] * stored[1] > limit:
        raise ImageError("image_too_large", f"{uri}: {stored[0]}x{stored[1]} is over the limit of {limit} pixels")
    # NOTE: a JPEG's orientation is in its header, so its draft size is right; other formats may carry theirs
    # after the pixels, so the orientation is read again once they are loaded.
    draft_box = _draft(image, _final_size(stored, _orientation(image), uri, settings))
    with budget.hold(image.width * image.height) if budget is not None else nullcontext():
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("image_truncated", f"{uri}: the pixel data is cut short or corrupt ({exc})") from None
        orientation = _orientation(image)
        final = _final_size(stored, orientation, uri, settings)
        rgb = _rgb(image)
        if rgb.size != final or draft_box is not None:
            rgb = rgb.resize(final, Image.Resampling.BICUBIC, box=draft_box)
        method = _TRANSPOSE.get(orientation)
        prepared = rgb if method is None else rgb.transpose(method)
        if prepared is not image:
            image.close()
    upright = stored[::-1] if orientation in _SIDES_SWAPPED else stored
    return LoadedImage(uri, prepared, upright)


def _final_size(stored: tuple[int, int], orientation: int, uri: str, settings: Settings) -> tuple[int, int]:
    """The final size in the file's own orientation: `smart_resize` of the upright image, turned back."""
    swapped = orientation in _SIDES_SWAPPED
    width, height = stored[::-1] if swapped else stored
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError("aspect_ratio", f"{uri}: a {width}x{height} image is over the aspect ratio {MAX_ASPECT_RATIO}")
    model = settings.model
    final = resized_size(width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels)
    return final[::-1] if swapped else final


def _draft(image: Image.Image, final: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Ask a JPEG decoder for the smallest DCT-scaled image still at least the final size; the box of the original
    within the scaled image, or None when it is decoded at full size."""
    if image.format not in ("JPEG", "MPO"):
        return None
    full = image.size
    drafted = image.draft("RGB", final)
    return None if drafted is None or image.size == full else drafted[1]


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


@dataclass(frozen=True)
class ImagePool:
    """The threads that prepare images and the pixel budget they share (one per process and configuration)."""

    executor: ThreadPoolExecutor
    budget: PixelBudget


@cache
def _pool(threads: int, pixel_budget: int) -> ImagePool:
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vlmflow-image")
    return ImagePool(executor, PixelBudget(pixel_budget))


def image_pool(settings: Settings) -> ImagePool:
    """The process's image pool for these settings (`worker.image_threads`, `worker.image_pixel_budget`)."""
    return _pool(settings.worker.image_threads, settings.worker.image_pixel_budget)


# -- a job's images ------------------------------------------------------------------------------------------


def load_image(uri: str, settings: Settings, store: Minio) -> LoadedImage:
    """Check, fetch and prepare one image (blocking: for tools and tests; the worker uses `load_images`)."""
    source = image_source(uri, settings)
    data = fetch_bytes(source, settings, store)
    return prepare_image(data, uri=source.uri, settings=settings, budget=image_pool(settings).budget)


async def _load(uri: str, settings: Settings, store: Minio, pool: ImagePool) -> LoadedImage:
    source = await asyncio.to_thread(image_source, uri, settings)
    data = await asyncio.to_thread(fetch_bytes, source, settings, store)
    prepare = partial(prepare_image, data, uri=source.uri, settings=settings, budget=pool.budget)
    return await asyncio.get_running_loop().run_in_executor(pool.executor, prepare)


async def load_images(uris: Sequence[str], settings: Settings, store: Minio) -> list[LoadedImage]:
    """Every image of a job, fetched and prepared in parallel off the event loop; the first failing one (in job
    order) raises."""
    pool = image_pool(settings)
    results = await asyncio.gather(*(_load(uri, settings, store, pool) for uri in uris), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [result for result in results if isinstance(result, LoadedImage)]
