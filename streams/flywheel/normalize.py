"""Raw logs of every source format → one `NormalizedLog`. A pure function: no clock, no I/O, no offsets.

The format is told by shape: `kind: "vlmflow-job"` (the worker's own events), `request` + `response` objects
(OpenAI-style gateway logs), or `req_id` (the legacy flat app log). Anything it cannot read raises
`schemas.InvalidLog` with a stable code (`schemas.logs.InvalidLogCode`), never another exception.

The field readers check every value they return (types, finite numbers, sizes of at least one pixel, aware UTC
times), so the `NormalizedLog` is built from their fields without pydantic validating them again (`_trusted`):
validation cost more than reading the log. A property test holds the two constructions equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ValidationError

from schemas.boxes import is_finite
from schemas.errors import InvalidLog, first_error
from schemas.logs import Feedback, ImageInfo, InvalidLogCode, JobEvent, Lineage, NormalizedLog, SourceFormat
from streams.flywheel.jsontext import RefusedJson, canonical, loads
from streams.flywheel.model_output import JsonValue, OutputError, check_depth, normalize_objects, parse_json_text
from streams.flywheel.timeparse import TimeError, parse_log_time

_S3_PRESIGN_PARAMS = frozenset(
    {"x-amz-signature", "x-amz-credential", "x-amz-algorithm", "signature", "awsaccesskeyid"}
)
"""Query parameters of a path-style S3 (or MinIO) presigned URL: such a URL becomes `s3://bucket/key`."""
_PLAIN_S3 = re.compile(r"s3://([^/?#\[\]\t\r\n]*+)/++([^?#\t\r\n]*+)")
"""An `s3://bucket/key` URI that `urlsplit` would read the same way (no query, fragment, brackets or the control
characters it drops): read directly, as most image references are. Possessive, as `_PLAIN_HTTP`: `/+` followed by
a key that may hold `/` backtracked quadratically (20,000 slashes and a `#` took seconds)."""
_PLAIN_HTTP = re.compile(
    r"(https?)://([^/?#\[\]\x00-\x20\x80-\U0010ffff]++)(/[^?#\x00-\x20]*+)?(?:\?([^#\x00-\x20]*+))?"
)
"""An http(s) URL that `urlsplit` splits at its first `/` and `?` and leaves as it is: a lowercase scheme, an
ASCII host part without brackets (nothing there it could refuse), no fragment, no spaces or control characters
(which it strips or drops). Groups: scheme, netloc, path, query. Possessive: a long text that does not match
fails in linear time."""
_BARE_KEY = re.compile(r"[^:\[\]\x80-\U0010ffff]+")
"""A `bucket/key` reference that `urlsplit` reads without a scheme and cannot refuse (no `:`, brackets or
non-ASCII text)."""
_OTHER_STORES = re.compile(r"x-goog-.*|googleaccessid|x-oss-.*|ossaccesskeyid|x-cos-.*")
"""Signing parameters of stores that are not S3: their URLs are not read as `s3://` even when `Signature` is
among the parameters (Google's V2 signed URLs)."""
SIGNING_PARAM = re.compile(
    r"x-(?:amz|goog|oss|cos|ms)-[a-z0-9-]{1,40}|signature|sig|awsaccesskeyid|googleaccessid|ossaccesskeyid"
    r"|key-pair-id|policy|token|access_token|auth|authorization"
)
"""Query parameters (lowercased) of signed URLs — AWS and MinIO, Google Cloud Storage, Alibaba OSS, Tencent COS,
Azure SAS (`sig`), CloudFront — and of bearer tokens: a URL carrying any of them is kept without its query, since
the signature would grant access to whoever reads the dataset."""
_NUMERIC = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")
_EXACT_FLOAT_INT = 2**53
"""Whole numbers up to this one are exact as floats."""
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")
_THUMBS: dict[object, Feedback] = {1: "positive", 0: "none", -1: "negative", "up": "positive", "down": "negative"}
_RATINGS: dict[str, Feedback] = {"up": "positive", "down": "negative"}


def _fail(code: InvalidLogCode, message: str) -> NoReturn:
    raise InvalidLog(code, message)


def raw_log_id(raw: dict[str, Any] | bytes | str) -> str:
    """A stable id for a raw log, readable or not: a hash of its canonical JSON, or of its bytes when it is not
    JSON. A redelivered or replayed copy gets the same id."""
    if isinstance(raw, dict):
        return log_id_of(canonical(raw))
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        return log_id_of(canonical(loads(data), finite=True))
    except (ValueError, RecursionError):
        return log_id_of(data)


def log_id_of(body: bytes) -> str:
    return "log-" + hashlib.sha256(body).hexdigest()[:24]


def load_raw(raw: dict[str, Any] | bytes | str) -> dict[str, Any]:
    """The raw log as a JSON object; `not_json` / `not_an_object` otherwise."""
    if isinstance(raw, dict):
        return raw
    try:
        value = loads(raw)
    except RefusedJson as refused:
        # NOTE: a name of its own: compiled (mypyc), a name bound by two `except` clauses keeps the first one's type.
        _fail("not_json", str(refused))
    except (ValueError, RecursionError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        _fail("not_json", detail)
    if not isinstance(value, dict):
        _fail("not_an_object", f"a JSON {type(value).__name__}")
    return value


def detect_format(value: dict[str, Any]) -> SourceFormat:
    if value.get("kind") == "vlmflow-job":
        return "vlmflow-job"
    if "request" in value and "response" in value:
        return "openai-chat"
    if "req_id" in value:
        return "legacy-flat"
    _fail("unknown_format", "no kind=vlmflow-job, no request+response, no req_id")


def normalize(
    raw: dict[str, Any] | bytes | str, *, lineage: Lineage | None = None, synonyms: dict[str, str] | None = None
) -> NormalizedLog:
    """Read one raw log of any source format; raise `InvalidLog` with a stable code when it cannot be read."""
    if isinstance(raw, dict):
        return normalize_loaded(raw, raw_log_id(raw), lineage=lineage, synonyms=synonyms)
    value = load_raw(raw)
    return normalize_loaded(value, loaded_log_id(value), lineage=lineage, synonyms=synonyms)


def loaded_log_id(value: Any) -> str:
    """`raw_log_id` of a raw log already read by `load_raw` (which refuses NaN and infinities)."""
    return log_id_of(canonical(value, finite=True))


def normalize_loaded(
    value: dict[str, Any], log_id: str, *, lineage: Lineage | None = None, synonyms: dict[str, str] | None = None
) -> NormalizedLog:
    """`normalize` of a raw log already read (`load_raw`) and identified (`loaded_log_id`)."""
    source_format = detect_format(value)
    fields = _READERS[source_format](value)
    images: list[ImageInfo] = fields["images"]
    width, height = (images[0].width, images[0].height) if images else (None, None)
    answer: JsonValue | None = fields.pop("answer", None)
    if answer is None and fields["output_text"] is not None:
        try:
            answer = parse_json_text(fields["output_text"])
        except OutputError as exc:
            fields["output_error"] = str(exc)
    if answer is not None:
        answer, problems = normalize_objects(answer, width=width, height=height, synonyms=synonyms or {})
        fields["output"] = answer
        if problems:
            fields["output_error"] = "; ".join(problems)
    if fields.get("correction") is not None:
        correction, problems = normalize_objects(
            fields["correction"], width=width, height=height, synonyms=synonyms or {}
        )
        if problems:
            _fail("invalid_correction", "; ".join(problems))
        fields["correction"] = correction
    if fields["request_id"] is None:
        fields["request_id"] = log_id
    return _trusted(NormalizedLog, {"log_id": log_id, "source_format": source_format, "lineage": lineage, **fields})


M = TypeVar("M", bound=BaseModel)


def _trusted(model: type[M], fields: dict[str, Any]) -> M:
    """`model(**fields)` for fields the readers checked already: the same instance (field order, defaults, the
    set of fields given), without validation. Every field without a default must be in `fields`; none of these
    models has a default factory."""
    instance = object.__new__(model)
    _set_dict(instance, {**_DEFAULTS[model], **fields})
    _set_fields_set(instance, set(fields))
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance


_set_dict, _set_fields_set, _set_extra, _set_private = (
    BaseModel.__dict__[slot].__set__
    for slot in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
)
"""The setters of a model's four slots (frozen models refuse `setattr`): called directly, they cost about half of
`object.__setattr__` by name (with it, building an `ImageInfo` here cost as much as validating one)."""


_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {
    model: {name: field.default for name, field in model.model_fields.items()} for model in (NormalizedLog, ImageInfo)
}
"""Each field's default, in field order (required fields hold a placeholder that `fields` always replaces)."""


# -- field readers: each takes the value and a path for its error message --------------------------------------


def _text(value: object, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and is_finite(value):
        return str(value)
    _fail("invalid_field", f"{path}: expected text, got {type(value).__name__}")


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail("invalid_field", f"{path}: expected an object, got {type(value).__name__}")
    return value


def _number(value: object, path: str) -> float | None:
    """A finite number, from a JSON number or numeric text."""
    if type(value) is int and is_finite(value):
        return float(value)
    if value is None:
        return None
    if isinstance(value, str) and _NUMERIC.match(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
        _fail("invalid_field", f"{path}: expected a number")
    return float(value)


def _count(value: object, path: str) -> int | None:
    # NOTE: an int up to 2**53 is what the float round trip below returns; larger ones lose digits there.
    if type(value) is int and 0 <= value <= _EXACT_FLOAT_INT:
        return value
    number = _number(value, path)
    if number is None:
        return None
    if number < 0 or number != int(number):
        _fail("invalid_field", f"{path}: expected a whole number ≥ 0")
    return int(number)


def _size(value: object, path: str) -> int | None:
    number = _count(value, path)
    if number == 0:
        _fail("invalid_image", f"{path}: an image side of 0 pixels")
    return number


def _time(value: object, path: str) -> Any:
    try:
        return parse_log_time(value)
    except TimeError as exc:
        _fail("invalid_timestamp", f"{path}: {exc}")


def _json_value(value: object, path: str, code: InvalidLogCode) -> JsonValue | None:
    """An object or array given as such or as JSON text (fences and prose tolerated, as in answers)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_json_text(value)
        except OutputError as exc:
            _fail(code, f"{path}: {exc}")
    if not isinstance(value, dict | list):
        _fail(code, f"{path}: expected an object, an array or JSON text")
    try:
        check_depth(value)
    except OutputError as exc:
        _fail(code, f"{path}: {exc}")
    return value


def image_uri(reference: object, path: str) -> str:
    """`s3://bucket/key` for s3 URIs, `bucket/key` and path-style S3 presigned URLs (query dropped); other http(s)
    URLs are kept as they are (the worker fetches those only from allow-listed hosts), without their query when it
    signs them (`SIGNING_PARAM`: a signature in a dataset would grant access to the image)."""
    text = reference.strip() if isinstance(reference, str) else ""
    if not text:
        _fail("invalid_image", f"{path}: expected an image URI")
    plain = _PLAIN_S3.fullmatch(text)
    if plain is not None:
        return _s3(plain.group(1), plain.group(2), path)
    if _BARE_KEY.fullmatch(text):
        return _bare_s3(text, path)
    if text.startswith("data:"):
        _fail("inline_image", f"{path}: an inline data: image")
    parts = _split(text, path)
    if parts.scheme == "s3":
        return _s3(parts.netloc, parts.path.lstrip("/"), path)
    if parts.scheme in ("http", "https"):
        query = _query_names(parts.query)
        if query & _S3_PRESIGN_PARAMS and not any(_OTHER_STORES.fullmatch(name) for name in query):
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            return _s3(bucket, key, path)
        if not parts.netloc:
            _fail("invalid_image", f"{path}: a URL without a host")
        if any(SIGNING_PARAM.fullmatch(name) for name in query):
            return parts._replace(query="", fragment="").geturl()
        return text
    if parts.scheme:
        _fail("invalid_image", f"{path}: scheme {parts.scheme!r} is not s3 or http(s)")
    return _bare_s3(text, path)


def _split(text: str, path: str) -> SplitResult:
    """`urlsplit(text)`; plain http(s) URLs (`_PLAIN_HTTP`, most presigned ones) are split directly, at a third
    of the cost (`urlsplit` caches 128 URLs, and a stream of logs holds distinct ones)."""
    plain = _PLAIN_HTTP.fullmatch(text)
    if plain is not None:
        scheme, netloc, url_path, query = plain.groups("")
        return SplitResult(scheme, netloc, url_path, query, "")
    try:
        return urlsplit(text)
    except ValueError:
        _fail("invalid_image", f"{path}: not a URI")


def _query_names(query: str) -> set[str]:
    """The lowercased parameter names of a URL query, as `parse_qsl(query, keep_blank_values=True)` reads them:
    directly when no name or value needs decoding (no `%` or `+`)."""
    if "%" in query or "+" in query:
        return {name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)}
    return {part.partition("=")[0].lower() for part in query.split("&") if part}


def _bare_s3(text: str, path: str) -> str:
    bucket, _, key = text.partition("/")
    return _s3(bucket, key, path)


def _s3(bucket: str, key: str, path: str) -> str:
    if not bucket or not key or "/" in bucket:
        _fail("invalid_image", f"{path}: expected bucket/key")
    return f"s3://{bucket}/{key}"


# -- the source formats ------------------------------------------------------------------------------------------


def _openai_chat(value: dict[str, Any]) -> dict[str, Any]:
    request = _object(value["request"], "request")
    response = _object(value["response"], "response")
    metadata = _object(value.get("metadata") or {}, "metadata")
    if value.get("created") is not None:
        timestamp = _time(value["created"], "created")
    else:
        timestamp = _time(value.get("timestamp"), "timestamp")
    prompt, uris = _messages(request.get("messages"))
    sizes = value.get("x_image_sizes")
    if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(uris)):
        _fail("invalid_image", f"x_image_sizes: expected one [w, h] per image part ({len(uris)})")
    images = [_image(uri, sizes[index] if sizes else None, f"x_image_sizes[{index}]") for index, uri in enumerate(uris)]
    usage = _object(response.get("usage") or {}, "response.usage")
    status_code = value.get("status_code")
    if status_code is not None and (isinstance(status_code, bool) or not isinstance(status_code, int)):
        _fail("invalid_field", "status_code: expected an HTTP status number")
    failed = status_code is not None and not 200 <= status_code < 300
    feedback = _object(value.get("feedback") or {}, "feedback")
    rating = feedback.get("rating")
    if rating is not None and (not isinstance(rating, str) or rating not in _RATINGS):
        _fail("invalid_field", "feedback.rating: expected 'up' or 'down'")
    return {
        "request_id": _text(value.get("id"), "id"),
        "timestamp": timestamp,
        "tenant": _text(value.get("tenant"), "tenant") or _text(metadata.get("tenant"), "metadata.tenant") or "default",
        "model": _text(request.get("model"), "request.model"),
        "task": _text(metadata.get("task"), "metadata.task"),
        "prompt": prompt,
        "images": images,
        "output_text": _choice_text(response.get("choices")),
        "latency_ms": _number(value.get("latency_ms"), "latency_ms"),
        "status": "error" if failed else "ok",
        "error_code": f"http_{status_code}" if failed else None,
        "feedback": _RATINGS[rating] if rating is not None else "none",
        "correction": _json_value(feedback.get("correction"), "feedback.correction", "invalid_correction"),
        "prompt_tokens": _count(usage.get("prompt_tokens"), "response.usage.prompt_tokens"),
        "completion_tokens": _count(usage.get("completion_tokens"), "response.usage.completion_tokens"),
    }


def _messages(messages: object) -> tuple[str, list[str]]:
    """The text of the last user turn, and every image part's URL in order."""
    if not isinstance(messages, list) or not messages:
        _fail("invalid_field", "request.messages: expected a non-empty list")
    prompt = ""
    uris: list[str] = []
    # NOTE: paths are written only where a value needs one (an error, an image URI): most turns are plain text.
    for index, message in enumerate(messages):
        message = message if isinstance(message, dict) else _object(message, f"request.messages[{index}]")
        content = message.get("content")
        if isinstance(content, str):
            texts = [content]
        else:
            texts, images = _content(content, f"request.messages[{index}].content")
            uris.extend(images)
        if message.get("role") == "user":
            prompt = "\n".join(texts)
    return prompt, uris


def _content(content: object, path: str) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        _fail("invalid_field", f"{path}: expected text or a list of parts")
    texts: list[str] = []
    uris: list[str] = []
    for index, part in enumerate(content):
        part = part if isinstance(part, dict) else _object(part, f"{path}[{index}]")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            texts.append(text if isinstance(text, str) else _text(text, f"{path}[{index}].text") or "")
        elif kind == "image_url":
            where = f"{path}[{index}].image_url"
            image = part.get("image_url")
            url = _object(image, where).get("url") if not isinstance(image, str) else image
            uris.append(image_uri(url, where))
        else:
            _fail("invalid_field", f"{path}[{index}].type: expected 'text' or 'image_url'")
    return texts, uris


def _image(uri: str, size: object, path: str) -> ImageInfo:
    """An `ImageInfo` with the size given as `[width, height]` (or none)."""
    if size is None:
        return _trusted(ImageInfo, {"uri": uri, "width": None, "height": None})
    if not isinstance(size, list) or len(size) != 2:
        _fail("invalid_image", f"{path}: expected [width, height]")
    return _trusted(
        ImageInfo, {"uri": uri, "width": _size(size[0], f"{path}[0]"), "height": _size(size[1], f"{path}[1]")}
    )


def _choice_text(choices: object) -> str | None:
    if choices is None or choices == []:
        return None
    if not isinstance(choices, list):
        _fail("invalid_field", "response.choices: expected a list")
    message = _object(_object(choices[0], "response.choices[0]").get("message") or {}, "response.choices[0].message")
    content = message.get("content")
    if isinstance(content, list):
        texts, _ = _content(content, "response.choices[0].message.content")
        return "".join(texts)
    return _text(content, "response.choices[0].message.content")


def _legacy_flat(value: dict[str, Any]) -> dict[str, Any]:
    request_id = _text(value["req_id"], "req_id")
    image = value.get("img")
    images = []
    if image is not None:
        uri = image_uri(image, "img")
        width, height = _size(value.get("img_w"), "img_w"), _size(value.get("img_h"), "img_h")
        images.append(_trusted(ImageInfo, {"uri": uri, "width": width, "height": height}))
    latency_s = _number(value.get("lat"), "lat")
    return {
        "request_id": request_id,
        "timestamp": _time(value.get("ts"), "ts"),
        "tenant": _text(value.get("app"), "app") or "default",
        "model": _text(value.get("model"), "model"),
        "task": _text(value.get("task"), "task"),
        "prompt": _text(value.get("q"), "q") or "",
        "images": images,
        "output_text": _text(value.get("ans"), "ans"),
        "latency_ms": latency_s * 1000 if latency_s is not None else None,
        "status": "ok" if _flag(value.get("ok"), "ok") else "error",
        "feedback": _thumbs(value.get("thumbs")),
        "correction": _json_value(value.get("fix"), "fix", "invalid_correction"),
    }


def _thumbs(value: object) -> Feedback:
    """1/0/-1 (numbers or text) or "up"/"down"; absent means no feedback."""
    if value is None:
        return "none"
    key: object = None
    if isinstance(value, str):
        text = value.strip().lower()
        key = int(text) if text in ("1", "0", "-1") else text
    elif isinstance(value, int | float) and not isinstance(value, bool):
        key = value
    if key not in _THUMBS:
        _fail("invalid_field", "thumbs: expected 1, 0, -1, 'up' or 'down'")
    return _THUMBS[key]


def _flag(value: object, path: str) -> bool:
    """true/false, "true"/"false", 1/0, "yes"/"no"; absent means true (the legacy app logged failures only)."""
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, int | str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    _fail("invalid_field", f"{path}: expected true/false, 1/0 or yes/no")


def _vlmflow_job(value: dict[str, Any]) -> dict[str, Any]:
    # NOTE: `JobResult` fills a missing `finished_at` with the current time, which would make the log's time that
    # of its reading (the worker writes it on every result).
    result = value.get("result")
    if isinstance(result, dict) and "finished_at" not in result:
        _fail("invalid_timestamp", "result.finished_at: missing")
    try:
        event = JobEvent.model_validate(value)
    except ValidationError as exc:
        _fail("invalid_field", ": ".join(first_error(exc)))
    job, result = event.job, event.result
    if event.image_sizes and len(event.image_sizes) != len(job.images):
        _fail("invalid_image", f"image_sizes: expected one (w, h) per image ({len(job.images)})")
    images = [
        _image(image_uri(uri, f"job.images[{index}]"), list(event.image_sizes[index]) if event.image_sizes else None,
               f"image_sizes[{index}]")
        for index, uri in enumerate(job.images)
    ]  # fmt: skip
    error = result.error
    output = result.output
    if output is not None:
        try:
            check_depth(output)
        except OutputError as exc:
            _fail("invalid_field", f"result.output: {exc}")
    return {
        "request_id": job.job_id,
        "timestamp": result.finished_at,
        "tenant": job.tenant,
        "model": result.model,
        "task": job.task,
        "prompt": job.prompt or "",
        "images": images,
        "output_text": json.dumps(output, sort_keys=True) if output is not None else None,
        "answer": output,
        "output_error": f"{error.code}: {error.message}" if error and error.code == "output_invalid" else None,
        "latency_ms": result.timings.queue_ms + result.timings.total_ms,
        "status": result.status,
        "error_code": error.code if error else None,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "attempt": max(job.attempt, result.attempt),
    }


_READERS: dict[SourceFormat, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "openai-chat": _openai_chat,
    "legacy-flat": _legacy_flat,
    "vlmflow-job": _vlmflow_job,
}
