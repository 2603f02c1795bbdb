"""Image sources and preparation: every kind of bad image or URI gets its own stable code at once; good images come
out RGB, upright and at exactly the model's `smart_resize` grid, with the decoded pixels held at once bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from schemas.settings import Settings, load_settings
from workers.images import (
    ACCEPTED_FORMATS,
    ImageError,
    PixelBudget,
    image_pool,
    image_source,
    load_images,
    prepare_image,
)
from workers.tokens import image_tokens, resized_size, smart_resize, vision_spec


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        s3={"image_buckets": ["vlm-images"]},
        worker={"url_allow_list": ["images.example.com", "cdn.example.com:8443"], "max_inline_image_bytes": 4096},
    )


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` and whose pixel data is one empty chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def with_pixel_limit(settings: Settings, limit: int) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"max_image_pixels": limit})})


def prepare_code(data: bytes, settings: Settings) -> str:
    with pytest.raises(ImageError) as caught:
        prepare_image(data, uri="test", settings=settings)
    return caught.value.code


def final_size(width: int, height: int, settings: Settings) -> tuple[int, int]:
    model = settings.model
    return resized_size(width, height, family=model.family, min_pixels=model.min_pixels, max_pixels=model.max_pixels)


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# -- sources ---------------------------------------------------------------------------------------------------


def test_s3_uri_in_an_image_bucket_is_accepted(settings: Settings) -> None:
    source = image_source("s3://vlm-images/a/b c.png", settings)
    assert (source.kind, source.bucket, source.key) == ("s3", "vlm-images", "a/b c.png")


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("s3://other-bucket/a.png", "bucket_forbidden"),
        ("https://evil.example.org/a.png", "url_forbidden"),
        ("http://images.example.com.evil.org/a.png", "url_forbidden"),
        ("ftp://images.example.com/a.png", "invalid_image_uri"),
        ("data:image/png,not-base64-flagged", "image_undecodable"),
        ("data:image/png;base64,@@@@", "image_undecodable"),
        ("data:image/png;base64," + "A" * 8000, "payload_too_large"),
    ],
)
def test_sources_outside_the_configuration_get_their_code(settings: Settings, uri: str, code: str) -> None:
    with pytest.raises(ImageError) as caught:
        image_source(uri, settings)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "uri",
    [
        "s3://vlm-images",
        "s3://vlm-images/",
        "s3://vlm-images/../x.png",
        "s3://vlm-images/a/../../other-bucket/x.png",
        "s3://vlm-images/a/./x.png",
        "s3://vlm-images/./x.png",
        "s3://vlm-images/a//x.png",
        "s3://vlm-images/a/",
        "s3://vlm-images/a\\..\\x.png",
        "s3://vlm-images/a\nb.png",
        "s3://vlm-images/" + "k" * 1100,
        "http://10.0.0.1:80\\@images.example.com/",
        "http://evil.example.org@images.example.com/a.png",
        "http://user:pw@images.example.com/a.png",
        "http://images.example.com:http/a.png",
        "http://images.example.com:99999/a.png",
        "http://images.example.com/a/../secret.png",
        "http://images.example.com/a/./b.png",
        "http://images.example.com/a/%2e%2e/secret.png",
        "http://images.example.com/a b.png",
        "http://images.example.com/caf\u00e9.png",
        "http://images.example.com\t/a.png",
        "http://images.exa mple.com/a.png",
        "http:///a.png",
        "gopher://images.example.com/a.png",
        "file:///etc/hostname",
        "/etc/hostname",
    ],
)
def test_malformed_or_ambiguous_uris_are_invalid_input(settings: Settings, uri: str) -> None:
    """Bad input, answered at once: never an internal error that is retried and dead-lettered."""
    with pytest.raises(ImageError) as caught:
        image_source(uri, settings)
    assert caught.value.code == "invalid_image_uri", caught.value


async def test_a_job_with_a_malformed_uri_fails_with_that_code_not_a_crash(settings: Settings) -> None:
    with pytest.raises(ImageError) as caught:
        await load_images(["http://10.0.0.1:80\\@images.example.com/"], settings, store=None)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_image_uri"


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("https://images.example.com/cat.jpg", True),
        ("http://images.example.com/cat.jpg", True),
        ("http://IMAGES.example.com:80/cat.jpg", True),
        ("https://images.example.com:443/cat.jpg", True),
        ("http://images.example.com:443/cat.jpg", False),
        ("https://images.example.com:8443/cat.jpg", False),
        ("http://images.example.com:6379/cat.jpg", False),
        ("http://images.example.com:0/cat.jpg", False),
        ("https://cdn.example.com:8443/cat.jpg", True),
        ("https://cdn.example.com/cat.jpg", False),
    ],
)
def test_only_allow_listed_ports_are_fetched(settings: Settings, uri: str, allowed: bool) -> None:
    if allowed:
        assert image_source(uri, settings).kind == "url"
        return
    with pytest.raises(ImageError) as caught:
        image_source(uri, settings)
    assert caught.value.code == "url_forbidden"


def test_inline_uri_is_decoded_and_shortened_for_logs(settings: Settings) -> None:
    data = encoded(Image.new("RGB", (4, 4)), "PNG")
    source = image_source("data:image/png;base64," + base64.b64encode(data).decode(), settings)
    assert source.inline_bytes == data
    assert source.uri == "data:image/png;base64,..."


# -- preparation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "CMYK"), ("WEBP", "RGB")]
)
def test_any_mode_comes_out_rgb_at_the_final_size(settings: Settings, fmt: str, mode: str) -> None:
    prepared = prepare_image(encoded(Image.new(mode, (300, 200)), fmt), uri="test", settings=settings)
    assert prepared.image.mode == "RGB"
    assert prepared.size == (300, 200)
    assert prepared.image.size == final_size(300, 200, settings) == (308, 196)


def test_transparent_pixels_become_white(settings: Settings) -> None:
    prepared = prepare_image(encoded(Image.new("RGBA", (56, 56), (0, 0, 0, 0)), "PNG"), uri="t", settings=settings)
    assert prepared.image.getpixel((0, 0)) == (255, 255, 255)


def test_a_large_image_reaches_the_engine_at_its_final_size_not_its_own(settings: Settings) -> None:
    """The engine's processor finds nothing to resample: the image is already what `smart_resize` makes of it."""
    prepared = prepare_image(
        encoded(Image.effect_noise((4000, 3000), 40).convert("RGB"), "JPEG"), uri="t", settings=settings
    )
    assert prepared.size == (4000, 3000)
    assert prepared.image.size == (1148, 840)
    assert image_tokens(*prepared.size, max_pixels=settings.model.max_pixels) == 1_230
    factor = vision_spec(settings.model.family).factor
    assert smart_resize(840, 1148, factor, vision_spec("qwen2-vl").min_pixels, 1_003_520) == (840, 1148)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_turns_the_image_upright_at_the_final_size(settings: Settings, orientation: int) -> None:
    """A marker in the stored top-left corner ends up where the EXIF orientation says it is displayed."""
    stored = Image.new("RGB", (640, 320), "white")
    stored.paste((255, 0, 0), (0, 0, 160, 80))
    prepared = prepare_image(
        encoded(stored, "JPEG", exif=exif_with_orientation(orientation), quality=95), uri="t", settings=settings
    )
    upright = (320, 640) if orientation >= 5 else (640, 320)
    assert prepared.size == upright
    assert prepared.image.size == final_size(*upright, settings)
    width, height = prepared.image.size
    corner = {
        1: (0, 0), 2: (width - 1, 0), 3: (width - 1, height - 1), 4: (0, height - 1),
        5: (0, 0), 6: (width - 1, 0), 7: (width - 1, height - 1), 8: (0, height - 1),
    }[orientation]  # fmt: skip
    red, green, _ = prepared.image.getpixel(corner)  # type: ignore[misc]
    assert red > 200 and green < 60, (orientation, prepared.image.getpixel(corner))


def test_png_orientation_stored_after_the_pixels_still_turns_the_image(settings: Settings) -> None:
    prepared = prepare_image(
        encoded(Image.new("RGB", (640, 320)), "PNG", exif=exif_with_orientation(6)), uri="t", settings=settings
    )
    assert prepared.size == (320, 640)
    assert prepared.image.size == final_size(320, 640, settings)


def test_a_large_jpeg_is_decoded_at_a_dct_scale_and_stays_close_to_a_full_decode(settings: Settings) -> None:
    """24 MP decoded at 1/4 scale as 1.5 MP (still above the final 1204x812): a sixteenth of the memory."""
    source = Image.linear_gradient("L").resize((6000, 4000)).convert("RGB")
    budget = PixelBudget(10**9)
    prepared = prepare_image(encoded(source, "JPEG", quality=95), uri="t", settings=settings, budget=budget).image
    assert budget.peak == 1500 * 1000
    assert prepared.size == final_size(6000, 4000, settings)
    reference = source.resize(prepared.size, Image.Resampling.BICUBIC)
    worst = max(abs(a - b) for a, b in zip(prepared.tobytes(), reference.tobytes(), strict=True))
    assert worst <= 8


@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    orientation=st.sampled_from([1, 3, 6, 8]),
    fmt=st.sampled_from(["JPEG", "PNG"]),
)
@hypothesis_settings(max_examples=60, deadline=None)
def test_the_final_size_is_always_the_token_estimators(width: int, height: int, orientation: int, fmt: str) -> None:
    settings = load_settings()
    if max(width, height) / min(width, height) > 200:
        return
    data = encoded(Image.new("RGB", (width, height), "gray"), fmt, exif=exif_with_orientation(orientation))
    prepared = prepare_image(data, uri="t", settings=settings)
    upright = (height, width) if orientation >= 5 else (width, height)
    assert prepared.size == upright
    assert prepared.image.size == final_size(*upright, settings)


def test_random_bytes_are_undecodable(settings: Settings) -> None:
    assert prepare_code(b"this is not an image at all" * 10, settings) == "image_undecodable"


def test_a_cut_short_jpeg_is_truncated(settings: Settings) -> None:
    data = encoded(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    assert prepare_code(data[: len(data) // 2], settings) == "image_truncated"


def test_a_cut_short_png_is_truncated(settings: Settings) -> None:
    data = encoded(Image.effect_noise((256, 256), 64), "PNG")
    assert prepare_code(data[: len(data) // 2], settings) == "image_truncated"


def test_pixels_over_the_limit_are_refused_before_decoding(settings: Settings) -> None:
    assert prepare_code(png_header_only(10_000, 5_000), with_pixel_limit(settings, 40_000_000)) == "image_too_large"


def test_pillows_own_bomb_guard_maps_to_the_same_code(settings: Settings) -> None:
    assert prepare_code(png_header_only(30_000, 30_000), with_pixel_limit(settings, 10**12)) == "image_too_large"


def test_an_image_at_the_pixel_limit_is_accepted(settings: Settings) -> None:
    data = encoded(Image.new("RGB", (100, 40)), "PNG")
    assert prepare_image(data, uri="t", settings=with_pixel_limit(settings, 4_000)).size == (100, 40)


def test_an_aspect_ratio_over_200_is_refused_before_decoding(settings: Settings) -> None:
    assert prepare_code(png_header_only(201 * 20, 20), settings) == "aspect_ratio"


# -- the pixel budget --------------------------------------------------------------------------------------------


def test_the_budget_never_holds_more_than_its_capacity_and_serves_in_order() -> None:
    budget = PixelBudget(100)
    order: list[int] = []
    started = threading.Barrier(2)

    def holder() -> None:
        with budget.hold(80):
            started.wait()
            time.sleep(0.2)

    def waiter(index: int, pixels: int) -> None:
        with budget.hold(pixels):
            order.append(index)
            assert budget.in_use <= budget.capacity

    first = threading.Thread(target=holder)
    first.start()
    started.wait()
    waiters = []
    for index, pixels in enumerate([60, 10, 500]):
        thread = threading.Thread(target=waiter, args=(index, pixels))
        thread.start()
        waiters.append(thread)
        time.sleep(0.05)  # NOTE: only orders the arrivals; the assertions below do not depend on timing
    for thread in [first, *waiters]:
        thread.join(timeout=30)
    assert order == [0, 1, 2], "first come, first served: the small one does not overtake the one before it"
    assert budget.peak <= budget.capacity
    assert budget.in_use == 0


async def test_a_job_of_large_images_never_holds_more_decoded_pixels_than_the_budget(settings: Settings) -> None:
    """16 images of 12 MP each, prepared 4 at a time, with room for 30 MP decoded at once: at most 2 at a time."""
    budget = 30_000_000
    settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(
                update={"image_threads": 4, "image_pixel_budget": budget, "max_inline_image_bytes": 2**24}
            )
        }
    )
    data = encoded(Image.new("RGB", (4000, 3000), "navy"), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    pool = image_pool(settings)
    images = await asyncio.wait_for(load_images([uri] * 16, settings, store=None), timeout=300)  # type: ignore[arg-type]
    assert [image.image.size for image in images] == [final_size(4000, 3000, settings)] * 16
    assert 0 < pool.budget.peak <= budget
    assert pool.budget.in_use == 0


# -- hostile input: every URI and every byte string is a source, a prepared image or a typed error ------------------

FUZZ_SETTINGS = load_settings(worker={"url_allow_list": ["images.example.com", "127.0.0.1:8080"]})
URI_PREFIXES = ["", "s3://vlm-images/", "http://", "https://images.example.com", "http://[", "data:image/png;base64,"]
URI_CHARS = "s3:/data;base64,http://images.example.com:8080@\\..%2e?#[]::1 \t\x00\u00e9"


def small_images() -> list[bytes]:
    images = []
    for fmt in ACCEPTED_FORMATS:
        image = Image.effect_noise((64, 48), 40).convert("P" if fmt == "GIF" else "RGB")
        images.append(encoded(image, fmt, **({"exif": exif_with_orientation(6)} if fmt in ("JPEG", "PNG") else {})))
    return images


SMALL_IMAGES = small_images()


@given(st.sampled_from(URI_PREFIXES), st.text(alphabet=URI_CHARS, max_size=40) | st.text(max_size=40))
@hypothesis_settings(max_examples=500)
def test_any_uri_is_a_source_or_a_typed_error(prefix: str, rest: str) -> None:
    try:
        image_source(prefix + rest, FUZZ_SETTINGS)
    except ImageError:
        pass


@given(
    st.sampled_from(SMALL_IMAGES),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=4)), max_size=6),
    st.floats(0.05, 1.0),
)
@hypothesis_settings(max_examples=300, deadline=None)
def test_a_damaged_image_is_prepared_or_a_typed_error(
    data: bytes, edits: list[tuple[float, bytes]], keep: float
) -> None:
    damaged = bytearray(data)
    for where, replacement in edits:
        start = int(where * len(damaged))
        damaged[start : start + len(replacement)] = replacement
    try:
        prepared = prepare_image(bytes(damaged[: max(1, int(keep * len(damaged)))]), uri="t", settings=FUZZ_SETTINGS)
    except ImageError:
        return
    assert prepared.image.mode == "RGB" and prepared.image.size == final_size(*prepared.size, FUZZ_SETTINGS)
