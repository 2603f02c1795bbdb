"""`streams.flywheel.normalize.image_uri`: its direct readings of plain URLs against `urlsplit` and `parse_qsl`,
and the whole function against the definition it replaced, on hostile references."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import InvalidLog
from streams.flywheel.normalize import (
    _BARE_KEY,
    _OTHER_STORES,
    _PLAIN_HTTP,
    _S3_PRESIGN_PARAMS,
    SIGNING_PARAM,
    _fail,
    _query_names,
    _split,
    image_uri,
)

_REFERENCE_PLAIN_S3 = re.compile(r"s3://([^/?#\[\]\t\r\n]*)/+([^?#\t\r\n]*)")


def reference_image_uri(reference: object, path: str) -> str:
    """`image_uri` as it was before its fast paths: every reference split by `urlsplit` and `parse_qsl`."""
    if not isinstance(reference, str) or not reference.strip():
        _fail("invalid_image", f"{path}: expected an image URI")
    text = reference.strip()
    plain = _REFERENCE_PLAIN_S3.fullmatch(text)
    if plain is not None:
        return _reference_s3(plain.group(1), plain.group(2), path)
    if text.startswith("data:"):
        _fail("inline_image", f"{path}: an inline data: image")
    try:
        parts = urlsplit(text)
    except ValueError:
        _fail("invalid_image", f"{path}: not a URI")
    if parts.scheme == "s3":
        return _reference_s3(parts.netloc, parts.path.lstrip("/"), path)
    if parts.scheme in ("http", "https"):
        query = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if query & _S3_PRESIGN_PARAMS and not any(_OTHER_STORES.fullmatch(name) for name in query):
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            return _reference_s3(bucket, key, path)
        if not parts.netloc:
            _fail("invalid_image", f"{path}: a URL without a host")
        if any(SIGNING_PARAM.fullmatch(name) for name in query):
            return parts._replace(query="", fragment="").geturl()
        return text
    if parts.scheme:
        _fail("invalid_image", f"{path}: scheme {parts.scheme!r} is not s3 or http(s)")
    bucket, _, key = text.partition("/")
    return _reference_s3(bucket, key, path)


def _reference_s3(bucket: str, key: str, path: str) -> str:
    if not bucket or not key or "/" in bucket:
        _fail("invalid_image", f"{path}: expected bucket/key")
    return f"s3://{bucket}/{key}"


def outcome(read: object, reference: object) -> tuple[str, str]:
    """The URI read, or the code and message of the refusal."""
    assert callable(read)
    try:
        return "uri", read(reference, "img")
    except InvalidLog as exc:
        return exc.code, str(exc)


# Pieces of hostile references: userinfo, backslashes, `@`, `%`, unicode hosts (some NFKC-normalize to `/`),
# brackets, ports, empty parts, fragments, `;`, repeated and encoded parameter names, controls and spaces. Each
# choice is a plain one four times in five, so that many references hold one odd piece, not ten.
_ODD = ["", "/", "//", "\\", "@", "%", "%2F", "%41", "%zz", "+", ";", ":", "?", "#", "=", "&", " ", "\t", "\n", "\x01"]


def _mostly(plain: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    return st.integers(0, 4).flatmap(lambda roll: st.sampled_from(odd if roll == 0 else plain))


_SCHEMES = _mostly(["http", "https"], ["HTTP", "hTtps", "s3", "S3", "ftp", "data", "", "1http", "ht tp"])
_SEPARATORS = _mostly(["://"], [":", ":/", ":///", "//", "", ":\\\\", "\t://"])
_USERINFO = _mostly([""], ["user@", "u:p@", "@", "a%40b@", "a@b@", "\\@"])
_HOSTS = _mostly(
    ["127.0.0.1", "minio.internal", "cdn.example.com"],
    ["bücher.de", "ex\u2100ample.com", "\uff0fhost", "[::1]", "[::1", "::1]", "[v1.x]", "ho st", "", "host\\evil",
     "xn--bcher-kva.de", "HOST", "-", "h#", "h\t"],
)  # fmt: skip
_PORTS = _mostly(["", ":9000"], [":", ":abc", ":99999", ":-1"])
_SEGMENTS = st.lists(_mostly(["vlm-images", "chat", "a.png"], ["a%20b.png", "é.png", "..", *_ODD]), max_size=4)
_PARAM_NAMES = _mostly(
    ["X-Amz-Signature", "x-amz-credential", "X-Amz-Algorithm", "a"],
    ["Signature", "AWSAccessKeyId", "sig", "token", "access_token", "policy", "Key-Pair-Id", "x-goog-signature",
     "GoogleAccessId", "OSSAccessKeyId", "x-cos-a", "X%2DAmz%2DSignature", "X-Amz-Signature+", "Sig%6eature", "",
     "a+b", "%", "=", "é"],
)  # fmt: skip
_PARAMS = st.lists(
    st.tuples(_PARAM_NAMES, _mostly(["=v", ""], ["=", "=a=b", "=?", "=%2", "=é", "=#", "=\t"])), max_size=5
).map(lambda pairs: [name + value for name, value in pairs])
_QUERIES = st.just("") | st.builds(
    lambda mark, params, separator: mark + separator.join(params),
    _mostly(["?"], ["", "??", "?&"]),
    _PARAMS,
    _mostly(["&"], [";", "&&"]),
)
URLS = st.builds(
    lambda space, scheme, separator, userinfo, host, port, segments, query, fragment, end: (
        f"{space}{scheme}{separator}{userinfo}{host}{port}{''.join('/' + part for part in segments)}{query}"
        f"{fragment}{end}"
    ),
    _mostly([""], [" ", "\t", "\x01", "\n "]),
    _SCHEMES,
    _SEPARATORS,
    _USERINFO,
    _HOSTS,
    _PORTS,
    _SEGMENTS,
    _QUERIES,
    _mostly([""], ["#", "#f", "#a?b", "#x-amz-signature=1"]),
    _mostly([""], [" ", "\r\n", "\x00", "\t/x"]),
)
"""Hostile references shaped like URLs."""


def _put_in(text: str, pieces: list[tuple[int, str]]) -> str:
    for at, piece in pieces:
        text = text[:at] + piece + text[at:]
    return text


MUTATED = st.builds(
    _put_in,
    st.sampled_from(
        ["http://127.0.0.1:9000/vlm-images/a.png?X-Amz-Algorithm=A&X-Amz-Signature=ab",
         "https://u:p@cdn.example.com/a/b.png?token=t&x=1", "https://h?a", "vlm-images/a.png", "s3://b/k"]
    ),
    st.lists(st.tuples(st.integers(0, 80), st.sampled_from([*_ODD, "[", "]", "é", "\u2100"])), min_size=1, max_size=3),
)  # fmt: skip
"""Plain references with one to three odd pieces put in anywhere."""
TEXTS = st.lists(st.sampled_from([*"aAzZ09.-_~éü℀／[]", "s3", "http", "://", *_ODD]), max_size=20).map("".join)
"""Hostile references of any shape, from the characters that matter to URL splitting."""


@settings(max_examples=3000, deadline=None)
@given(
    URLS | MUTATED | TEXTS | st.sampled_from(["s3:", "s3://", "s3://b/k", "http://", "https://h", "vlm-images/a.png"])
)
def test_image_uri_reads_every_reference_as_the_urlsplit_definition_did(text: str) -> None:
    assert outcome(image_uri, text) == outcome(reference_image_uri, text)


@settings(max_examples=2000, deadline=None)
@given(URLS | MUTATED | TEXTS)
def test_a_plain_http_url_is_split_as_urlsplit_splits_it(text: str) -> None:
    if _PLAIN_HTTP.fullmatch(text) is not None:
        assert _split(text, "img") == urlsplit(text)


@settings(max_examples=2000, deadline=None)
@given(URLS | MUTATED | TEXTS)
def test_a_bare_key_has_no_scheme_for_urlsplit(text: str) -> None:
    if _BARE_KEY.fullmatch(text) is not None:
        assert urlsplit(text).scheme == ""


@settings(max_examples=2000, deadline=None)
@given(_PARAMS.map("&".join) | TEXTS)
def test_query_names_are_the_names_parse_qsl_reads(query: str) -> None:
    assert _query_names(query) == {name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)}


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("vlm-images/a.png", "s3://vlm-images/a.png"),
        ("http://u:p@127.0.0.1:9000/vlm-images/a.png?X-Amz-Signature=1", "s3://vlm-images/a.png"),
        ("https://cdn.example.com/a.png?token=t&x=1", "https://cdn.example.com/a.png"),
        ("https://cdn.example.com/a.png?x=1&&size=2", "https://cdn.example.com/a.png?x=1&&size=2"),
        ("https://storage.example.com/b/a.png?GoogleAccessId=g&Signature=s", "https://storage.example.com/b/a.png"),
        ("https://minio.example.com/vlm-images/a.png?X%2DAmz%2DSignature=1", "s3://vlm-images/a.png"),
        ("https://cdn.example.com/a.png#x?X-Amz-Signature=1", "https://cdn.example.com/a.png#x?X-Amz-Signature=1"),
    ],
)
def test_plain_urls_read_directly(url: str, uri: str) -> None:
    assert image_uri(url, "img") == reference_image_uri(url, "img") == uri


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "url",
    ["s3://b" + "/" * 100_000 + "#", "http://h" + "/" * 100_000 + "#", "http://" + "a" * 100_000 + "[", "b/" * 50_000],
)
def test_long_references_are_read_in_linear_time(url: str) -> None:
    """`s3://b` and 20,000 slashes with a `#` once took seconds (the pattern backtracked quadratically)."""
    outcome(image_uri, url)
