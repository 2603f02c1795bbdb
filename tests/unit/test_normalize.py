"""`streams.flywheel.normalize`: every documented source variant by example, and arbitrary JSON by property."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.errors import InvalidLog
from schemas.jobs import ImageJob, JobError, JobResult, Timings
from schemas.logs import JobEvent, Lineage, NormalizedLog
from schemas.topics import Topic
from streams.flywheel.model_output import parse_json_text
from streams.flywheel.normalize import _count, _fail, _number, normalize, raw_log_id
from streams.flywheel.pii import redact_log
from streams.flywheel.timeparse import EPOCH_MS_ABOVE, TimeError, parse_log_time

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EPOCH = int(T.timestamp())
IMAGE = "s3://vlm-images/a.png"


def chat(**overrides: Any) -> dict[str, Any]:
    log: dict[str, Any] = {
        "id": "chatcmpl-1",
        "created": EPOCH,
        "request": {
            "model": "qwen2-vl-7b",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "find cats"},
                        {"type": "image_url", "image_url": {"url": IMAGE}},
                    ],
                },  # fmt: skip
            ],
        },
        "response": {
            "choices": [{"message": {"role": "assistant", "content": '{"caption": "a cat"}'}}],
            "usage": {"prompt_tokens": 1016, "completion_tokens": 9},
        },
        "latency_ms": 420,
        "status_code": 200,
        "x_image_sizes": [[640, 480]],
    }
    log.update(overrides)
    return log


def legacy(**overrides: Any) -> dict[str, Any]:
    log: dict[str, Any] = {
        "req_id": "r-1",
        "ts": EPOCH,
        "app": "shop",
        "img": "vlm-images/a.png",
        "img_w": 640,
        "img_h": 480,
        "q": "what is this?",
        "ans": '{"caption": "a cat"}',
        "lat": 0.42,
        "ok": True,
    }
    log.update(overrides)
    return log


def with_answer(text: str, **overrides: Any) -> dict[str, Any]:
    return chat(response={"choices": [{"message": {"content": text}}]}, **overrides)


def code_of(raw: Any) -> str:
    with pytest.raises(InvalidLog) as caught:
        normalize(raw)
    return caught.value.code


# -- openai-chat -------------------------------------------------------------------------------------------------


def test_openai_chat_fields() -> None:
    lineage = Lineage(topic=Topic.LOGS_RAW, partition=2, offset=7)
    log = normalize(chat(), lineage=lineage)
    assert log.source_format == "openai-chat"
    assert log.request_id == "chatcmpl-1"
    assert log.timestamp == T
    assert log.tenant == "default"
    assert log.model == "qwen2-vl-7b"
    assert log.prompt == "find cats"
    assert [(i.uri, i.width, i.height) for i in log.images] == [(IMAGE, 640, 480)]
    assert log.output == {"caption": "a cat"} and log.output_error is None
    assert (log.prompt_tokens, log.completion_tokens, log.latency_ms) == (1016, 9, 420.0)
    assert (log.status, log.feedback, log.correction) == ("ok", "none", None)
    assert log.lineage == lineage
    assert log.log_id == raw_log_id(chat()) == raw_log_id(json.dumps(chat(), indent=2).encode())


@pytest.mark.parametrize(
    ("time_fields", "expected"),
    [
        ({"created": EPOCH}, T),
        ({"created": None, "timestamp": "2026-03-01T12:00:00Z"}, T),
        ({"created": None, "timestamp": "2026-03-01T14:00:00+02:00"}, T),
        ({"created": None, "timestamp": "2026-03-01T07:00:00.000-05:00"}, T),
    ],
)
def test_openai_chat_times(time_fields: dict[str, Any], expected: datetime) -> None:
    log = normalize(chat(**time_fields))
    assert log.timestamp == expected and log.timestamp.tzinfo is UTC


def test_openai_chat_tenant_from_either_place() -> None:
    assert normalize(chat(tenant="acme")).tenant == "acme"
    assert normalize(chat(metadata={"tenant": "globex", "task": "detect"})).tenant == "globex"
    assert normalize(chat(metadata={"tenant": "globex", "task": "detect"})).task == "detect"


def test_openai_chat_string_content_and_image_string_part() -> None:
    messages = [
        {"role": "system", "content": "answer in JSON"},
        {"role": "user", "content": [{"type": "image_url", "image_url": "vlm-images/b.png"}]},
        {"role": "user", "content": "and now the second question"},
    ]
    log = normalize(chat(request={"model": "m", "messages": messages}, x_image_sizes=[[10, 20]]))
    assert log.prompt == "and now the second question"
    assert [(i.uri, i.width, i.height) for i in log.images] == [("s3://vlm-images/b.png", 10, 20)]


def test_openai_chat_sizes_follow_image_order_and_are_optional() -> None:
    parts = [{"type": "image_url", "image_url": {"url": f"s3://b/{n}.png"}} for n in range(2)]
    request = {"messages": [{"role": "user", "content": [{"type": "text", "text": "compare"}, *parts]}]}
    log = normalize(chat(request=request, x_image_sizes=[[1, 2], [3, 4]]))
    assert [(i.width, i.height) for i in log.images] == [(1, 2), (3, 4)]
    log = normalize(chat(request=request, x_image_sizes=None))
    assert [(i.width, i.height) for i in log.images] == [(None, None), (None, None)]
    assert code_of(chat(request=request, x_image_sizes=[[1, 2]])) == "invalid_image"


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("s3://vlm-images/dir/a.png", "s3://vlm-images/dir/a.png"),
        ("http://127.0.0.1:9000/vlm-images/dir/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=ab",
         "s3://vlm-images/dir/a.png"),
        ("https://minio.example.com/vlm-images/a%20b.png?X-Amz-Credential=k&X-Amz-Signature=c",
         "s3://vlm-images/a b.png"),
        ("https://cdn.example.com/pictures/a.png", "https://cdn.example.com/pictures/a.png"),
    ],
)  # fmt: skip
def test_image_uris(url: str, uri: str) -> None:
    request = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert normalize(chat(request=request)).images[0].uri == uri


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,iVBORw0KGgo=", "inline_image"),
        ("ftp://host/a.png", "invalid_image"),
        ("just-a-name", "invalid_image"),
        ("http://[::1/a.png", "invalid_image"),
        ("s3://bucket-only", "invalid_image"),
    ],
)
def test_unreadable_image_uris(url: str, code: str) -> None:
    request = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert code_of(chat(request=request, x_image_sizes=None)) == code


def test_openai_chat_status_usage_and_content_parts() -> None:
    failed = normalize(chat(status_code=503, response={"error": {"message": "overloaded"}}))
    assert (failed.status, failed.error_code, failed.output_text, failed.output) == ("error", "http_503", None, None)
    assert normalize(chat(status_code=201)).status == "ok"
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": '{"caption":'},
                                                  {"type": "text", "text": ' "x"}'}]}}]}  # fmt: skip
    assert normalize(chat(response=parts)).output == {"caption": "x"}


def test_openai_chat_feedback_and_corrections() -> None:
    assert normalize(chat(feedback={"rating": "up"})).feedback == "positive"
    fix = {"objects": [{"label": "Dog", "bbox_2d": [1, 2, 3, 4]}]}
    as_object = normalize(chat(feedback={"rating": "down", "correction": fix}))
    as_text = normalize(chat(feedback={"rating": "down", "correction": json.dumps(fix)}))
    assert as_object.feedback == as_text.feedback == "negative"
    assert as_object.correction == as_text.correction == {"objects": [{"label": "dog", "bbox_xyxy": [1, 2, 3, 4]}]}
    assert code_of(chat(feedback={"rating": "meh"})) == "invalid_field"
    assert code_of(chat(feedback={"rating": "down", "correction": "not json"})) == "invalid_correction"
    assert code_of(chat(feedback={"rating": "down", "correction": 3})) == "invalid_correction"


# -- legacy-flat -------------------------------------------------------------------------------------------------


def test_legacy_flat_fields() -> None:
    log = normalize(legacy())
    assert log.source_format == "legacy-flat"
    assert (log.request_id, log.timestamp, log.tenant, log.prompt) == ("r-1", T, "shop", "what is this?")
    assert [(i.uri, i.width, i.height) for i in log.images] == [(IMAGE, 640, 480)]
    assert (log.output, log.latency_ms, log.status, log.feedback) == ({"caption": "a cat"}, 420.0, "ok", "none")
    assert normalize(legacy(req_id=42, app=None)).request_id == "42"
    assert normalize(legacy(app=None)).tenant == "default"


@pytest.mark.parametrize(
    "ts",
    [EPOCH, EPOCH * 1000, str(EPOCH), float(EPOCH), "2026-03-01 12:00:00", "2026-03-01T12:00:00Z",
     "2026-03-01T13:00:00+01:00", "2026-03-01T12:00:00"],
)  # fmt: skip
def test_legacy_flat_times(ts: Any) -> None:
    assert normalize(legacy(ts=ts)).timestamp == T


@pytest.mark.parametrize("ts", [None, "yesterday", True, [EPOCH], 10**30, float("nan"), "9999-12-31T23:59:59-05:00"])
def test_legacy_flat_unreadable_times(ts: Any) -> None:
    assert code_of(legacy(ts=ts)) == "invalid_timestamp"


def test_legacy_flat_images_and_sizes() -> None:
    log = normalize(legacy(img="s3://vlm-images/a.png", img_w="640", img_h="480.0"))
    assert [(i.uri, i.width, i.height) for i in log.images] == [(IMAGE, 640, 480)]
    assert normalize(legacy(img_w=None, img_h=None)).images[0].width is None
    assert normalize(legacy(img=None)).images == []
    assert code_of(legacy(img_w="wide")) == "invalid_field"
    assert code_of(legacy(img_w=0)) == "invalid_image"
    assert code_of(legacy(img_w=12.5)) == "invalid_field"


@pytest.mark.parametrize(
    "ans",
    [
        '{"caption": "a cat"}',
        '```json\n{"caption": "a cat"}\n```',
        'Sure! Here is the answer:\n```json\n{"caption": "a cat"}\n```\nAnything else?',
        'Here is what I see in the image:\n{"caption": "a cat"}',
        'The answer:\n  {"caption": "a cat"}\nHope this helps.',
    ],
)
def test_legacy_flat_answer_forms(ans: str) -> None:
    log = normalize(legacy(ans=ans))
    assert log.output == {"caption": "a cat"} and log.output_error is None and log.output_text == ans


@pytest.mark.parametrize(
    ("ans", "reason"),
    [("I cannot see an image.", "not JSON"), ('"just text"', "JSON str"), ("", "empty"), ("[NaN]", "NaN")],
)
def test_legacy_flat_unparseable_answers_are_kept_with_the_reason(ans: str, reason: str) -> None:
    log = normalize(legacy(ans=ans))
    assert log.output is None and log.output_text == ans and reason in (log.output_error or "")


@pytest.mark.parametrize(
    ("ok", "status"),
    [(True, "ok"), (False, "error"), ("true", "ok"), ("false", "error"), (1, "ok"), (0, "error"), ("yes", "ok"),
     ("no", "error"), (None, "ok")],
)  # fmt: skip
def test_legacy_flat_ok_spellings(ok: Any, status: str) -> None:
    assert normalize(legacy(ok=ok)).status == status


@pytest.mark.parametrize(
    ("thumbs", "feedback"),
    [(1, "positive"), (0, "none"), (-1, "negative"), ("up", "positive"), ("down", "negative"), ("-1", "negative"),
     (None, "none")],
)  # fmt: skip
def test_legacy_flat_thumbs(thumbs: Any, feedback: str) -> None:
    assert normalize(legacy(thumbs=thumbs)).feedback == feedback


@pytest.mark.parametrize(
    ("field", "value"), [("ok", "maybe"), ("ok", 2), ("thumbs", 5), ("thumbs", True), ("lat", "slow")]
)
def test_legacy_flat_unreadable_fields(field: str, value: Any) -> None:
    assert code_of(legacy(**{field: value})) == "invalid_field"


def test_legacy_flat_fix_and_latency_text() -> None:
    log = normalize(legacy(thumbs=-1, fix='{"caption": "a dog"}', lat="1.5"))
    assert (log.correction, log.latency_ms) == ({"caption": "a dog"}, 1500.0)
    assert code_of(legacy(fix="a dog")) == "invalid_correction"


# -- vlmflow-job -------------------------------------------------------------------------------------------------


def job_event(result: JobResult, **job: Any) -> dict[str, Any]:
    image_job = ImageJob(job_id="job-1", task="detect", images=[IMAGE], prompt="find defects", tenant="factory", **job)
    return json.loads(JobEvent(job=image_job, result=result, image_sizes=[(640, 480)]).model_dump_json())


def test_vlmflow_job_event() -> None:
    result = JobResult(
        job_id="job-1", status="ok", task="detect", model="qwen2-vl", finished_at=T, attempt=1, prompt_tokens=1016,
        output={"objects": [{"label": "Scratch", "box_1000": [0, 0, 500, 500]}]},
        timings=Timings(queue_ms=10, total_ms=90),
    )  # fmt: skip
    log = normalize(job_event(result))
    assert log.source_format == "vlmflow-job"
    assert (log.request_id, log.timestamp, log.tenant, log.task, log.prompt) == ("job-1", T, "factory", "detect",
                                                                                  "find defects")  # fmt: skip
    assert (log.model, log.latency_ms, log.prompt_tokens, log.attempt) == ("qwen2-vl", 100.0, 1016, 1)
    assert log.output == {"objects": [{"label": "scratch", "bbox_xyxy": [0.0, 0.0, 320.0, 240.0]}]}
    assert json.loads(log.output_text or "") == result.output


def test_vlmflow_job_failures() -> None:
    invalid = JobResult(job_id="job-1", status="error", finished_at=T,
                        error=JobError(code="output_invalid", message="not the schema"))  # fmt: skip
    log = normalize(job_event(invalid))
    assert (log.status, log.error_code, log.output) == ("error", "output_invalid", None)
    assert log.output_error == "output_invalid: not the schema"
    broken = JobResult(job_id="job-1", status="error", finished_at=T,
                       error=JobError(code="image_undecodable", message="bad bytes"))  # fmt: skip
    assert normalize(job_event(broken)).output_error is None
    event = job_event(invalid)
    del event["result"]["status"]
    assert code_of(event) == "invalid_field"
    inline = job_event(invalid)
    inline["job"]["images"] = ["data:image/png;base64,AAAA"]
    assert code_of(inline) == "inline_image"


def test_a_job_result_without_its_finish_time_is_refused_not_stamped_now() -> None:
    """`JobResult` would fill the time in with the clock's; the log's time must come from the log."""
    event = job_event(JobResult(job_id="job-1", status="ok", task="detect", finished_at=T, output={"a": 1}))
    assert normalize(event).timestamp == T
    del event["result"]["finished_at"]
    assert code_of(event) == "invalid_timestamp"


# -- boxes and labels inside answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {"label": "Cat", "bbox_2d": [64, 96, 320, 288]},
        {"name": " CAT ", "bbox": [64, 96, 256, 192]},
        {"category": "cat", "box": [0.1, 0.2, 0.5, 0.6]},
        {"label": "cat", "box_1000": [100, 200, 500, 600]},
        {"label": "cat", "box_1000": "<|box_start|>(100,200),(500,600)<|box_end|>"},
        {"label": "cat", "bbox_2d": "<|box_start|>(100, 200),(500, 600)<|box_end|>"},
    ],
)
def test_every_box_form_becomes_absolute_xyxy(obj: dict[str, Any]) -> None:
    log = normalize(with_answer(json.dumps({"objects": [obj]})))
    assert log.output == {"objects": [{"label": "cat", "bbox_xyxy": [64.0, 96.0, 320.0, 288.0]}]}
    assert log.output_error is None


def test_qwen_grounding_text_answer() -> None:
    text = "<|object_ref_start|>Cat<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    log = normalize(with_answer(text))
    assert log.output == {"objects": [{"label": "cat", "bbox_xyxy": [64.0, 96.0, 320.0, 288.0]}]}


def test_boxes_round_to_a_tenth_and_labels_take_synonyms() -> None:
    answer = {"objects": [{"label": " Kitty", "box": [0.33333, 0.5, 0.66667, 1.0]}], "name": "Not A Label"}
    log = normalize(with_answer(json.dumps(answer)), synonyms={"KITTY": "Cat"})
    assert log.output == {"objects": [{"label": "cat", "bbox_xyxy": [213.3, 240.0, 426.7, 480.0]}],
                          "name": "Not A Label"}  # fmt: skip


def test_unreadable_boxes_are_kept_and_named() -> None:
    answer = {"objects": [{"label": "cat", "box": [0.1, 0.2, 0.3]}, {"label": 7, "bbox": [1, 1, -1, 1]}]}
    log = normalize(with_answer(json.dumps(answer)))
    assert log.output == answer
    assert log.output_error == (
        "objects[0].box: expected a list of 4 numbers; objects[1].bbox: an [x, y, w, h] box has a negative width or "
        "height; objects[1].label: a label must be text"
    )
    relative = normalize(with_answer('{"objects": [{"box": [0, 0, 1, 1]}]}', x_image_sizes=None))
    assert relative.output_error == "objects[0].box: a norm1 box needs the image size, which the log does not give"


def test_deep_answers_are_refused() -> None:
    deep = "[" * 40 + "]" * 40
    log = normalize(with_answer(deep))
    assert log.output is None and "nested deeper" in (log.output_error or "")


# -- what is not a log -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "not_json"),
        (b"\xff\xfe\x00", "not_json"),
        (b'{"req_id": NaN}', "not_json"),
        ("[1, 2]", "not_an_object"),
        (b"null", "not_an_object"),
        ({"message": "free text"}, "unknown_format"),
        ({"request": [], "response": {}}, "invalid_field"),
        ({"request": {"messages": []}, "response": {}, "created": EPOCH}, "invalid_field"),
        (chat(created=None), "invalid_timestamp"),
        (chat(status_code="200"), "invalid_field"),
        (chat(x_image_sizes=[[640, 0]]), "invalid_image"),
    ],
)
def test_invalid_logs(raw: Any, code: str) -> None:
    assert code_of(raw) == code


# -- properties --------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
"""Arbitrary JSON-like values, NaN and infinities included (Python's json reads and writes them)."""


def _shaped(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid log with some fields replaced or removed by arbitrary JSON: reaches the deep readers."""
    fields = st.sampled_from(sorted(base))
    return st.dictionaries(fields, JSON | st.just(None), max_size=4).map(lambda changes: {**base, **changes})


ANSWER_TEXT = st.one_of(
    st.text(max_size=60),
    JSON.map(json.dumps),
    JSON.map(lambda value: f"Here you go:\n```json\n{json.dumps(value)}\n```"),
    st.builds(
        lambda k, box: json.dumps({"objects": [{"label": "x", k: box}]}),
        st.sampled_from(["bbox_2d", "bbox", "box", "box_1000", "bbox_xyxy"]),
        JSON,
    ),  # fmt: skip
)


def _must_be_invalid_log_or_normalized(raw: Any) -> None:
    try:
        log = normalize(raw, synonyms={"x": "y"})
    except InvalidLog as exc:
        assert exc.code
        return
    assert isinstance(log, NormalizedLog)
    NormalizedLog.model_validate_json(log.model_dump_json())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(["req_id", "request", "response", "kind", "ts"]), JSON)))
def test_arbitrary_json_raises_only_invalid_log(raw: Any) -> None:
    _must_be_invalid_log_or_normalized(json.dumps(raw).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=60))
def test_arbitrary_bytes_raise_only_invalid_log(raw: bytes | str) -> None:
    _must_be_invalid_log_or_normalized(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_shaped(chat()), _shaped(legacy()), _shaped(legacy(thumbs=-1, fix="{}"))))
def test_format_shaped_json_raises_only_invalid_log(raw: dict[str, Any]) -> None:
    _must_be_invalid_log_or_normalized(raw)


@settings(max_examples=300, deadline=None)
@given(ANSWER_TEXT, st.booleans())
def test_any_answer_text_is_kept_or_explained(text: str, sized: bool) -> None:
    log = normalize(with_answer(text, x_image_sizes=[[640, 480]] if sized else None))
    assert log.output_text == text
    assert log.output is not None or log.output_error


@settings(max_examples=200, deadline=None)
@given(_shaped(json.loads(json.dumps(job_event(JobResult(job_id="job-1", status="ok", output={}, finished_at=T))))))
def test_job_shaped_json_raises_only_invalid_log(raw: dict[str, Any]) -> None:
    _must_be_invalid_log_or_normalized(raw)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "unit", [" ", "\n", "x", "1 ", "a@", "a.", "+1 ", "<|object_ref_start|>", "<|box_start|>(1 ", "```\n", "[1,", "{\n"]
)
def test_long_repetitive_texts_do_not_hang(unit: str) -> None:
    """Every pattern over answer and prompt text is linear: a 600 kB answer of one repeated unit once took minutes."""
    text = unit * (300_000 // len(unit))
    log = redact_log(normalize(legacy(ans=text, q=text)))
    assert log.output_text is not None and log.prompt


# -- issue 12 item 13 and issue 14: typed errors for any rating, labels under any label-like key -------------------


@pytest.mark.parametrize("rating", [{"value": "up"}, ["up"], 1, True])
def test_a_rating_that_is_no_text_is_an_invalid_field(rating: Any) -> None:
    assert code_of(chat(feedback={"rating": rating})) == "invalid_field"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["label", "Label", "NAME", "name", "Category", "class", "CLASS", "class-name", "Object", "tag"]),
    st.sampled_from(["bbox_2d", "BBox_2D", "bbox", "Box", "box_1000"]),
    st.text(min_size=1, max_size=20),
)
def test_no_object_with_a_label_like_key_loses_its_label(label_key: str, box_key: str, label: str) -> None:
    box = [0.1, 0.2, 0.3, 0.4] if box_key.lower() == "box" else [10, 20, 30, 40]
    log = normalize(with_answer(json.dumps({"objects": [{label_key: label, box_key: box}]})))
    assert log.output is not None
    (obj,) = log.output["objects"]
    assert obj["label"] == label.strip().lower() and "bbox_xyxy" in obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_shaped(chat()), _shaped(legacy()), _shaped(legacy(thumbs=-1, fix="{}"))))
def test_a_log_built_without_validation_equals_the_validated_one(raw: dict[str, Any]) -> None:
    """`normalize` builds the model from fields its readers checked, without validating them again."""
    try:
        log = normalize(raw, synonyms={"x": "y"})
    except InvalidLog:
        return
    validated = NormalizedLog(**{name: getattr(log, name) for name in log.model_fields_set})
    assert validated == log and validated.model_fields_set == log.model_fields_set
    assert validated.model_dump_json() == log.model_dump_json()


def test_a_json_answer_after_prose_with_box_tokens_in_its_strings_keeps_its_labels() -> None:
    """Grounding tokens are read only when the answer holds no JSON value (they were read first, and 7% of the
    benchmark's answers lost their labels)."""
    box = "<|box_start|>(237,201),(460,379)<|box_end|>"
    answer = f'Here is what I found:\n{{"objects": [{{"name": "PERSON", "box_1000": "{box}"}}]}}'
    assert parse_json_text(answer) == {"objects": [{"name": "PERSON", "box_1000": box}]}
    grounded = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert parse_json_text(grounded) == {
        "objects": [{"box_1000": "<|box_start|>(1,2),(3,4)<|box_end|>", "label": "cat"}]
    }


# -- fast paths against the definitions they replaced ------------------------------------------------------------

_REFERENCE_NUMERIC = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


def reference_number(value: object, path: str) -> float | None:
    """`_number` before its `int` fast path (and with an int beyond a float's range refused, not raised)."""
    if value is None:
        return None
    if isinstance(value, str) and _REFERENCE_NUMERIC.match(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not _reference_finite(value):
        _fail("invalid_field", f"{path}: expected a number")
    return float(value)


def _reference_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def reference_count(value: object, path: str) -> int | None:
    """`_count` before its `int` fast path."""
    number = reference_number(value, path)
    if number is None:
        return None
    if number < 0 or number != int(number):
        _fail("invalid_field", f"{path}: expected a whole number ≥ 0")
    return int(number)


def reference_parse_log_time(value: object) -> datetime:
    """`parse_log_time` before its fast paths (and with an int beyond a float's range refused, not raised)."""
    if isinstance(value, bool) or value is None:
        raise TimeError(f"expected an epoch number or a date-time text, got {type(value).__name__}")
    if isinstance(value, str) and re.match(r"^-?\d+(\.\d+)?$", value.strip()):
        value = float(value)
    if isinstance(value, int | float):
        if not _reference_finite(value):
            raise TimeError("epoch out of range" if isinstance(value, int) else "epoch is not a finite number")
        seconds = float(value)
        if not math.isfinite(seconds):
            raise TimeError("epoch is not a finite number")
        if abs(seconds) >= EPOCH_MS_ABOVE:
            seconds /= 1000
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):
            raise TimeError("epoch out of range") from None
    if not isinstance(value, str):
        raise TimeError(f"expected an epoch number or a date-time text, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise TimeError("not ISO 8601 or YYYY-MM-DD HH:MM:SS") from None


def result_of(read: Callable[..., object], *args: object) -> tuple[object, ...]:
    """What `read` returns (with its type and repr), or the type and message of what it raises."""
    try:
        value = read(*args)
    except (InvalidLog, TimeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return "value", value, type(value), repr(value)


_SPACE = st.sampled_from(["", " ", "\t", "\n", "\u3000"])
NUMBERS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**1100), 2**1100),
    st.integers(2**53 - 3, 2**53 + 3),
    st.floats(),
    st.builds(lambda a, text, b: a + text + b, _SPACE, st.from_regex(r"-?\d+(\.\d+)?", fullmatch=True), _SPACE),
    st.sampled_from(["1e3", "1_000", "0x10", "٣", "-0", "+1", "1.", ".5", "nan", "inf", ""]),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
"""Values where logs hold numbers: bool, float, text and ints far beyond a float's range included."""


@settings(max_examples=2000, deadline=None)
@given(NUMBERS)
def test_numbers_and_counts_are_read_as_before_their_int_fast_paths(value: object) -> None:
    assert result_of(_number, value, "lat") == result_of(reference_number, value, "lat")
    assert result_of(_count, value, "n") == result_of(reference_count, value, "n")


_ZONES = st.sampled_from([None, UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=23, minutes=59))])
TIMES = st.one_of(
    NUMBERS,
    st.integers(-(10**16), 10**16),
    st.builds(
        lambda moment, separator, zulu, a, b: a + moment.isoformat(separator).replace("+00:00", zulu) + b,
        st.datetimes(timezones=_ZONES),
        st.sampled_from(["T", " "]),
        st.sampled_from(["+00:00", "Z"]),
        _SPACE,
        _SPACE,
    ),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-03-01", "last tuesday"]),
)
"""Values where logs hold times: epochs in s and ms, ISO 8601 with and without zones, and the unreadable."""


@settings(max_examples=2000, deadline=None)
@given(TIMES)
def test_times_are_read_as_before_their_fast_paths(value: object) -> None:
    assert result_of(parse_log_time, value) == result_of(reference_parse_log_time, value)


@pytest.mark.parametrize("field", ["lat", "img_w", "ts"])
def test_an_integer_beyond_a_floats_range_is_an_invalid_field(field: str) -> None:
    """JSON numbers have no size limit; one too large for a float is bad input (it raised OverflowError, which
    made the record an `internal_error`)."""
    assert code_of(legacy(**{field: 10**400})) == ("invalid_timestamp" if field == "ts" else "invalid_field")
    with pytest.raises(TimeError):
        parse_log_time(-(10**400))
