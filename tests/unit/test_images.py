"""Image sources and decoding: every kind of bad image gets its own stable code; good ones come out RGB, upright."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from schemas.settings import Settings, load_settings
from workers.images import ImageError, decode_image, image_source


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        s3={"image_buckets": ["vlm-images"]},
        worker={"url_allow_list": ["images.example.com"], "max_inline_image_bytes": 4096},
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


def decode_code(data: bytes, max_pixels: int = 40_000_000) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, uri="test", max_pixels=max_pixels)
    return caught.value.code


def test_s3_uri_in_an_image_bucket_is_accepted(settings: Settings) -> None:
    source = image_source("s3://vlm-images/a/b.png", settings)
    assert (source.kind, source.bucket, source.key) == ("s3", "vlm-images", "a/b.png")


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("s3://other-bucket/a.png", "bucket_forbidden"),
        ("s3://vlm-images", "image_not_found"),
        ("https://evil.example.org/a.png", "url_forbidden"),
        ("http://images.example.com.evil.org/a.png", "url_forbidden"),
        ("data:image/png,not-base64-flagged", "image_undecodable"),
        ("data:image/png;base64,@@@@", "image_undecodable"),
        ("data:image/png;base64," + "A" * 8000, "payload_too_large"),
    ],
)
def test_sources_outside_the_configuration_get_their_code(settings: Settings, uri: str, code: str) -> None:
    with pytest.raises(ImageError) as caught:
        image_source(uri, settings)
    assert caught.value.code == code


def test_allow_listed_url_is_accepted(settings: Settings) -> None:
    assert image_source("https://images.example.com/cat.jpg", settings).kind == "url"


def test_inline_uri_is_decoded_and_shortened_for_logs(settings: Settings) -> None:
    data = encoded(Image.new("RGB", (4, 4)), "PNG")
    source = image_source("data:image/png;base64," + base64.b64encode(data).decode(), settings)
    assert source.inline_bytes == data
    assert source.uri == "data:image/png;base64,..."


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "CMYK"), ("WEBP", "RGB")]
)
def test_any_mode_comes_out_rgb(fmt: str, mode: str) -> None:
    image = decode_image(encoded(Image.new(mode, (30, 20)), fmt), uri="test", max_pixels=10_000)
    assert image.mode == "RGB"
    assert image.size == (30, 20)


def test_transparent_pixels_become_white() -> None:
    image = decode_image(encoded(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "PNG"), uri="test", max_pixels=100)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_turns_the_image_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encoded(Image.new("RGB", (64, 32)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, uri="test", max_pixels=10_000).size == (32, 64)


def test_random_bytes_are_undecodable() -> None:
    assert decode_code(b"this is not an image at all" * 10) == "image_undecodable"


def test_a_cut_short_jpeg_is_truncated() -> None:
    data = encoded(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    assert decode_code(data[: len(data) // 2]) == "image_truncated"


def test_a_cut_short_png_is_truncated() -> None:
    data = encoded(Image.effect_noise((256, 256), 64), "PNG")
    assert decode_code(data[: len(data) // 2]) == "image_truncated"


def test_pixels_over_the_limit_are_refused_before_decoding() -> None:
    assert decode_code(png_header_only(10_000, 5_000), max_pixels=40_000_000) == "image_too_large"


def test_pillows_own_bomb_guard_maps_to_the_same_code() -> None:
    assert decode_code(png_header_only(30_000, 30_000), max_pixels=10**12) == "image_too_large"


def test_an_image_at_the_pixel_limit_is_accepted() -> None:
    assert decode_image(encoded(Image.new("RGB", (100, 40)), "PNG"), uri="t", max_pixels=4_000).size == (100, 40)
