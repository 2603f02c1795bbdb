"""Mixed raw logs for the flywheel tests and benchmark: every source format and variant, broken logs, rule
violations, duplicates, retries and planted PII canaries, each with what the flywheel is expected to do with it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from schemas.jobs import ImageJob, JobError, JobResult, Timings
from schemas.logs import JobEvent

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BUCKET = "vlm-images"


@dataclass(frozen=True)
class PlannedLog:
    key: bytes
    value: bytes
    expect: str
    """`normalized`, `rejected:<code>` (normalization), `rule:<name>` or `duplicate`."""
    canaries: tuple[str, ...] = ()
    """PII written into the log that no output may contain."""
    planted_hard: bool = False
    """Negative feedback or a correction: a hard case whenever the log is normalized."""
    retry_group: str | None = None
    """Logs of one group ask the same request with different answers."""


@dataclass
class _Builder:
    rng: random.Random
    index: int = 0
    canaries: list[str] = field(default_factory=list)

    def pii(self) -> str:
        """A phrase with an email, a phone number and an ID number, each unique to this log."""
        email, number = f"canary{self.index}@example.org", f"990{self.index:09d}"
        phone = f"+1 415 555 {self.index % 10_000:04d}"
        self.canaries.extend([email, phone[3:], number])
        return f"contact {email} or {phone}, account {number}"

    def time_value(self, form: str) -> Any:
        moment = T0 + timedelta(seconds=self.index)
        return {
            "epoch_s": int(moment.timestamp()),
            "epoch_ms": int(moment.timestamp() * 1000),
            "epoch_text": str(int(moment.timestamp())),
            "plain": moment.strftime("%Y-%m-%d %H:%M:%S"),
            "iso_z": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "iso_offset": moment.astimezone(timezone(timedelta(hours=2))).isoformat(),
        }[form]

    def answer(self, *, width: int, height: int, with_pii: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(answer in a random box convention, the same answer with bbox_2d) for a detection."""
        x1, y1 = self.rng.randint(0, width // 2), self.rng.randint(0, height // 2)
        x2, y2 = x1 + self.rng.randint(5, width // 2), y1 + self.rng.randint(5, height // 2)
        label = self.rng.choice(["Cat", " dog ", "PERSON", "car"])
        form = self.rng.choice(["bbox_2d", "bbox", "box", "box_1000", "qwen_text"])
        boxes = {
            "bbox_2d": [x1, y1, x2, y2],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "box": [round(x1 / width, 4), round(y1 / height, 4), round(x2 / width, 4), round(y2 / height, 4)],
            "box_1000": [round(v * 1000 / s) for v, s in ((x1, width), (y1, height), (x2, width), (y2, height))],
        }
        if form == "qwen_text":
            a, b, c, d = boxes["box_1000"]
            key, box = "box_1000", f"<|box_start|>({a},{b}),({c},{d})<|box_end|>"
        else:
            key, box = form, boxes[form]
        obj: dict[str, Any] = {self.rng.choice(["label", "name", "category"]): label, key: box, "confidence": 0.9}
        answer: dict[str, Any] = {"objects": [obj], "note": f"seen {self.index}"}
        if with_pii:
            answer["note"] = self.pii()
        return answer, {"objects": [{"label": label, "bbox_2d": [x1, y1, x2, y2]}]}

    def answer_text(self, answer: dict[str, Any]) -> str:
        text = json.dumps(answer)
        return self.rng.choice([text, f"```json\n{text}\n```", f"Here is what I found:\n{text}"])


def _openai(b: _Builder, *, feedback: str | None, with_pii: bool, tenant: str = "acme", status: int = 200,
            image: str | None = None, prompt: str | None = None) -> dict[str, Any]:  # fmt: skip
    width, height = b.rng.choice([(640, 480), (1024, 768), (800, 600)])
    answer, corrected = b.answer(width=width, height=height, with_pii=with_pii)
    image = image or b.rng.choice(
        [
            f"s3://{BUCKET}/chat/{b.index}.png",
            f"http://127.0.0.1:9000/{BUCKET}/chat/{b.index}.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=ab",
            f"https://minio.internal/{BUCKET}/chat/{b.index}.png?X-Amz-Credential=k&X-Amz-Signature=cd",
        ]
    )
    text = prompt or f"find the objects in picture {b.index}" + (f"; {b.pii()}" if with_pii else "")
    if b.rng.random() < 0.5:
        messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                                 {"type": "image_url", "image_url": {"url": image}}]}]  # fmt: skip
    else:
        messages = [
            {"role": "system", "content": "answer in JSON"},
            {"role": "user", "content": [{"type": "image_url", "image_url": image}]},
            {"role": "user", "content": text},
        ]
    log: dict[str, Any] = {
        "id": f"chatcmpl-{b.index}",
        "request": {"model": "qwen2-vl-7b", "messages": messages},
        "response": {
            "choices": [{"message": {"role": "assistant", "content": b.answer_text(answer)}}],
            "usage": {"prompt_tokens": 1000 + b.index % 50, "completion_tokens": 40},
        },
        "latency_ms": 200 + b.index % 300,
        "status_code": status,
        "x_image_sizes": [[width, height]],
    }
    log.update({"created": b.time_value("epoch_s")} if b.rng.random() < 0.4 else
               {"timestamp": b.time_value(b.rng.choice(["iso_z", "iso_offset"]))})  # fmt: skip
    if b.rng.random() < 0.5:
        log["tenant"] = tenant
    else:
        log["metadata"] = {"tenant": tenant, "task": "detect"}
    if feedback == "up":
        log["feedback"] = {"rating": "up"}
    elif feedback == "down":
        correction: Any = corrected if b.rng.random() < 0.5 else json.dumps(corrected)
        log["feedback"] = {"rating": "down", "correction": correction}
    return log


def _legacy(b: _Builder, *, feedback: str | None, with_pii: bool, image: bool = True) -> dict[str, Any]:
    width, height = 640, 480
    answer, corrected = b.answer(width=width, height=height, with_pii=with_pii)
    log: dict[str, Any] = {
        "req_id": b.index if b.rng.random() < 0.3 else f"legacy-{b.index}",
        "ts": b.time_value(b.rng.choice(["epoch_s", "epoch_ms", "epoch_text", "plain", "iso_z", "iso_offset"])),
        "app": b.rng.choice(["shop", "claims"]),
        "q": f"what is in photo {b.index}?" + (f" {b.pii()}" if with_pii else ""),
        "ans": b.answer_text(answer),
        "lat": b.rng.choice([0.42, "0.42", 1]),
        "ok": b.rng.choice([True, "true", 1, "yes"]),
    }
    if image:
        log["img"] = b.rng.choice([f"{BUCKET}/legacy/{b.index}.jpg", f"s3://{BUCKET}/legacy/{b.index}.jpg"])
        log["img_w"], log["img_h"] = b.rng.choice([(width, height), (str(width), str(height))])
    if feedback == "up":
        log["thumbs"] = b.rng.choice([1, "up", "1"])
    elif feedback == "down":
        log["thumbs"] = b.rng.choice([-1, "down", "-1"])
        log["fix"] = json.dumps(corrected)
    else:
        log["thumbs"] = b.rng.choice([0, None, "0"])
    return log


def _job(b: _Builder, *, failed: bool) -> dict[str, Any]:
    job = ImageJob(job_id=f"job-{b.index}", task="detect", images=[f"s3://{BUCKET}/jobs/{b.index}.png"],
                   prompt=f"find defects on part {b.index}", tenant="factory")  # fmt: skip
    finished = T0 + timedelta(seconds=b.index)
    if failed:
        result = JobResult(job_id=job.job_id, status="error", task="detect", finished_at=finished, model="qwen2-vl",
                           error=JobError(code="output_invalid", message="not the task's schema"))  # fmt: skip
    else:
        output = {"objects": [{"label": "scratch", "bbox_2d": [10, 20, 110, 220], "confidence": 0.2}]}
        result = JobResult(job_id=job.job_id, status="ok", task="detect", output=output, finished_at=finished,
                           model="qwen2-vl", timings=Timings(queue_ms=5, total_ms=120), prompt_tokens=1016)  # fmt: skip
    return json.loads(JobEvent(job=job, result=result, image_sizes=[(640, 480)]).model_dump_json())


def mixed_raw_logs(count: int, *, seed: int = 7) -> list[PlannedLog]:
    """`count` raw logs in a fixed pseudo-random mix (same seed, same logs)."""
    rng = random.Random(seed)
    planned: list[PlannedLog] = []
    passed: list[PlannedLog] = []
    index = -1
    while len(planned) < count:
        index += 1
        b = _Builder(rng, index)
        roll = rng.random()
        key = f"r-{index}".encode()
        expect, value = "normalized", None
        feedback = rng.choice([None, None, None, "up", "down"])
        hard = feedback == "down"
        with_pii = rng.random() < 0.2
        if roll < 0.34:
            raw: Any = _openai(b, feedback=feedback, with_pii=with_pii)
        elif roll < 0.68:
            raw = _legacy(b, feedback=feedback, with_pii=with_pii)
        elif roll < 0.80:
            failed = rng.random() < 0.2
            raw, hard = _job(b, failed=failed), failed
        elif roll < 0.86:
            variant = rng.choice(["not_json", "not_an_object", "unknown_format", "invalid_timestamp", "inline_image",
                                  "invalid_field", "invalid_correction"])  # fmt: skip
            expect = f"rejected:{variant}"
            raw = _legacy(b, feedback=None, with_pii=with_pii)
            if variant == "not_json":
                value = f"{{'req_id': {index}, oops {b.pii()}".encode()
            elif variant == "not_an_object":
                raw = [index, "not a log"]
            elif variant == "unknown_format":
                raw = {"message": f"free text log {index}"}
            elif variant == "invalid_timestamp":
                raw["ts"] = "last tuesday"
            elif variant == "inline_image":
                raw["img"] = "data:image/png;base64,iVBORw0KGgo="
            elif variant == "invalid_field":
                raw["thumbs"] = "meh"
            else:
                raw["thumbs"], raw["fix"] = -1, "no json here"
        elif roll < 0.92:
            variant = rng.choice(["failed-request", "no-image", "test-traffic", "implausible-latency"])
            expect = f"rule:{variant}"
            if variant == "failed-request":
                raw = _openai(b, feedback=None, with_pii=with_pii, status=503)
            elif variant == "no-image":
                raw = _legacy(b, feedback=None, with_pii=with_pii, image=False)
            elif variant == "test-traffic":
                raw = _openai(b, feedback=None, with_pii=with_pii, tenant="loadtest-eu")
            else:
                raw = _legacy(b, feedback=None, with_pii=with_pii)
                raw["lat"] = -3
        elif roll < 0.96 and passed:
            # NOTE: a duplicate shares its original's key, so it lands behind the original in the same partition.
            original = rng.choice(passed)
            copy = json.loads(original.value)
            if rng.random() < 0.5:
                pass
            elif "job" in copy:
                copy["job"]["job_id"] = copy["result"]["job_id"] = f"resent-{index}"
            else:
                copy["req_id" if "req_id" in copy else "id"] = f"resent-{index}"
            planned.append(PlannedLog(original.key, json.dumps(copy).encode(), "duplicate"))
            continue
        elif len(planned) + 2 <= count:
            group = f"retry-{index}"
            image, prompt = f"s3://{BUCKET}/retry/{index}.png", f"count the bolts in picture {index}"
            for attempt in range(2):
                b.index = index * 10 + attempt + 1_000_000
                raw = _openai(b, feedback=None, with_pii=False, image=image, prompt=prompt)
                raw.pop("metadata", None)
                raw["tenant"] = "acme"
                planned.append(PlannedLog(f"{key.decode()}-{attempt}".encode(), json.dumps(raw).encode(),
                                          "normalized", retry_group=group))  # fmt: skip
            continue
        else:
            raw = _legacy(b, feedback=feedback, with_pii=with_pii)
        value = value if value is not None else json.dumps(raw).encode()
        canaries = tuple(b.canaries)
        log = PlannedLog(key, value, expect, canaries, planted_hard=expect == "normalized" and hard)
        planned.append(log)
        if expect == "normalized":
            passed.append(log)
    return planned
