"""Label Studio as the review surface, on the real thing: Label Studio 1.23.2 from PyPI started once for this
module (scripts/labelstudio-env.sh builds its environment), the session's broker, Redis and S3, the golden agent
in a Faust worker of its own, and the bridge in-process or as a child process (`vlmflow review ls run`).

Cases go out with the model's boxes as predictions; an annotation made through the API comes back as exactly one
correction and one golden record; bad annotations are reported on the task and never published; a webhook
missed while the bridge was down is caught by the poll; a bridge killed mid-sync and restarted publishes no
duplicate. The browser test drives Label Studio's own UI with Playwright on Debian's chromium (no browser
download): log in, open the task, see the image and the predicted boxes, move a box, pick the verdict, submit, and
the golden record shows the moved box.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.cases import Correction
from schemas.settings import Settings
from schemas.topics import Topic
from streams.review.labelstudio import serve
from tests.conftest import free_port_block
from tests.support.golden import golden_records, golden_worker, review_env
from tests.support.labelstudio import (
    DETECTED,
    annotate,
    bridge_process,
    enqueue,
    hard_case,
    isolated_settings,
    ls_call,
    put_image,
    queue_stats,
    start_labelstudio,
    task_of,
    verdict,
)
from tests.support.ops_data import read_topic
from tests.support.processes import stop_process
from vlmflow.stack import LocalStack, StackError, labelstudio_executable

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def labelstudio(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One Label Studio for the module, as `vlmflow dev up --with label-studio` starts it."""
    try:
        labelstudio_executable(stack_settings)
    except StackError as exc:
        pytest.skip(str(exc))
    stack, settings = start_labelstudio(tmp_path_factory.mktemp("labelstudio"), stack_settings, free_port_block())
    try:
        yield settings
    finally:
        stack.down()


@pytest.fixture
def ls_settings(settings: Settings, labelstudio: Settings) -> Settings:
    """The test's broker and queue, projects of its own in the module's Label Studio, a free webhook port."""
    return isolated_settings(settings, labelstudio.labelstudio.url, free_port_block())


def corrections(settings: Settings) -> list[Correction]:
    return [Correction.model_validate_json(record.value) for record in read_topic(settings, Topic.CORRECTIONS_DONE)]


def once(settings: Settings) -> dict[str, Any]:
    report = asyncio.run(serve(settings, once=True))
    return report.__dict__


def moved(region: dict[str, Any], dx_percent: float) -> dict[str, Any]:
    return {**region, "value": {**region["value"], "x": region["value"]["x"] + dx_percent}}


def wait_for(condition: Any, what: str, timeout_s: float = 120.0, log_path: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        detail = f"\n{log_path.read_text()[-3000:]}" if log_path and log_path.exists() else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}{detail}"
        time.sleep(0.5)


def test_the_stack_covers_label_studio_and_the_image_resolves_through_the_s3_storage(
    labelstudio: Settings, ls_settings: Settings
) -> None:
    (status,) = LocalStack(labelstudio, only=()).status()
    assert (status.name, status.state) == ("labelstudio", "running")
    uri = put_image(ls_settings, "ls/resolve.png")
    enqueue(ls_settings, hard_case("resolve", uri, output=DETECTED))
    assert once(ls_settings)["imported"] == 1
    task = task_of(ls_settings, "detect", "case-resolve")
    assert task["data"]["image"].startswith(f"/tasks/{task['id']}/resolve/")
    assert image_bytes(ls_settings, task).startswith(b"\x89PNG"), "Label Studio streams the image from the S3 store"


def image_bytes(settings: Settings, task: dict[str, Any]) -> bytes:
    """The task's image as the browser gets it: through Label Studio, which reads it from the S3 store."""

    async def fetch() -> bytes:
        import aiohttp

        token = settings.labelstudio.token.get_secret_value()
        async with aiohttp.ClientSession() as session:
            url = settings.labelstudio.url + task["data"]["image"]
            async with session.get(url, headers={"Authorization": f"Token {token}"}) as response:
                assert response.status == 200, await response.text()
                return await response.read()

    return asyncio.run(fetch())


def test_an_annotation_comes_back_as_one_correction_and_one_golden_record(
    ls_settings: Settings, tmp_path: Path
) -> None:
    uri = put_image(ls_settings, "ls/round.png")
    enqueue(ls_settings, hard_case("round", uri, output=DETECTED), hard_case("later", uri, output=DETECTED, priority=1))
    assert once(ls_settings)["imported"] == 2
    stats = queue_stats(ls_settings)
    assert (stats.pending, stats.leased) == (0, 2), "the queue holds both cases for the bridge"

    task = task_of(ls_settings, "detect", "case-round")
    assert (task["data"]["priority"], task["data"]["signals"]) == (500, "negative_feedback (+1): thumbs down")
    cat, other = task["predictions"][0]["result"]
    assert cat["value"]["rectanglelabels"] == ["cat"] and other["value"]["rectanglelabels"] == ["other"]
    assert cat["value"]["x"] == pytest.approx(100 / 640 * 100) and cat["value"]["width"] == pytest.approx(25.0)

    # The reviewer moves the cat 10 % of the width (64 px) right, keeps the unlisted box, says the model was wrong.
    annotate(ls_settings, task["id"], [moved(cat, 10.0), other, verdict("wrong")])
    env = review_env(ls_settings, ls_settings.streams.review_queue)
    with golden_worker(env, tmp_path / "golden.log") as worker:
        assert once(ls_settings)["published"] == 1
        assert once(ls_settings)["published"] == 0, "a second pass publishes nothing again"
        (record,) = golden_records(ls_settings, 1, worker, tmp_path / "golden.log", timeout_s=240)
    (correction,) = corrections(ls_settings)
    assert (correction.case_id, correction.reviewer, correction.task) == ("case-round", "admin@vlmflow.local", "detect")
    boxes = {item["label"]: item["bbox_xyxy"] for item in record.answer["objects"]}
    assert set(boxes) == {"cat", "truck"}, "the unlisted label comes back from the model's answer"
    for got, want in ((boxes["cat"], [164, 80, 324, 240]), (boxes["truck"], [380, 200, 560, 400])):
        assert all(abs(g - w) <= 1 for g, w in zip(got, want, strict=True)), (got, want)
    assert record.record_id == "case-round" and record.version == 1
    stats = queue_stats(ls_settings)
    assert (stats.submitted, stats.leased) == (1, 1), "the corrected case is done, the other stays claimed"


def test_bad_annotations_are_reported_on_the_task_and_never_published(ls_settings: Settings) -> None:
    uri = put_image(ls_settings, "ls/bad.png")
    extract = hard_case("extract", uri, task="extract", output={"total": 12})
    enqueue(
        ls_settings, hard_case("outside", uri, output=DETECTED), hard_case("unknown", uri, output=DETECTED), extract
    )
    assert once(ls_settings)["imported"] == 3
    outside = task_of(ls_settings, "detect", "case-outside")
    cat = outside["predictions"][0]["result"][0]
    annotate(ls_settings, outside["id"], [moved(cat, 90.0), verdict("wrong")])
    unknown = task_of(ls_settings, "detect", "case-unknown")
    unicorn = {**cat, "value": {**cat["value"], "rectanglelabels": ["unicorn"]}}
    annotate(ls_settings, unknown["id"], [unicorn, verdict("wrong")])
    extract_task = task_of(ls_settings, "extract", "case-extract")
    text = {"from_name": "answer", "to_name": "image", "type": "textarea", "value": {"text": ['{"total": 12,}']}}
    annotate(ls_settings, extract_task["id"], [text, verdict("wrong")])

    report = once(ls_settings)
    assert (report["published"], report["refused"]) == (0, 3)
    problems = {
        "case-outside": ("detect", "outside the image"),
        "case-unknown": ("detect", "'unicorn' is not one of cat, dog, person, other"),
        "case-extract": ("extract", "not JSON (Expecting property name enclosed in double quotes"),
    }
    for case_id, (task, message) in problems.items():
        shown = task_of(ls_settings, task, case_id)
        problem = shown["data"]["review_problem"]
        assert message in problem and problem.startswith("Not accepted:"), problem
        assert image_bytes(ls_settings, shown).startswith(b"\x89PNG"), "the task still shows its image"
    assert once(ls_settings)["refused"] == 0, "a refused version is reported once"
    assert corrections(ls_settings) == []
    stats = queue_stats(ls_settings)
    assert (stats.submitted, stats.leased) == (0, 3), "the cases stay open with the bridge"

    # The reviewer fixes the JSON: the new version is published and the problem cleared.
    fixed = {**text, "value": {"text": ['{"total": 12.5}']}}
    annotation_id = extract_task_annotation(ls_settings, "case-extract")
    ls_call(ls_settings, "PATCH", f"/api/annotations/{annotation_id}/", {"result": [fixed, verdict("wrong")]})
    assert once(ls_settings)["published"] == 1
    (correction,) = corrections(ls_settings)
    assert correction.output == {"total": 12.5}
    assert task_of(ls_settings, "extract", "case-extract")["data"]["review_problem"] == ""


def extract_task_annotation(settings: Settings, case_id: str) -> int:
    (annotation,) = task_of(settings, "extract", case_id)["annotations"]
    return int(annotation["id"])


def test_a_webhook_wakes_the_bridge_and_one_missed_is_caught_by_the_poll(ls_settings: Settings, tmp_path: Path) -> None:
    settings = ls_settings.model_copy(
        update={"labelstudio": ls_settings.labelstudio.model_copy(update={"poll_interval_s": 600.0})}
    )
    uri = put_image(settings, "ls/hook.png")
    enqueue(settings, hard_case("live", uri, output=DETECTED), hard_case("missed", uri, output=DETECTED))
    log_path = tmp_path / "bridge.log"
    with bridge_process(settings, log_path) as bridge:
        live = wait_for(lambda: _task_or_none(settings, "case-live"), "the bridge to import", log_path=log_path)
        wait_for(lambda: "webhooks on" in log_path.read_text(), "the webhook receiver", log_path=log_path)
        annotate(settings, live["id"], [live["predictions"][0]["result"][0], verdict("correct")])
        # The poll waits 600 s: only the webhook can make this correction appear within a minute.
        wait_for(lambda: corrections(settings), "the webhook to wake the bridge", 60, log_path)
        assert stop_process(bridge) == 0

    missed = task_of(settings, "detect", "case-missed")
    annotate(settings, missed["id"], [missed["predictions"][0]["result"][0], verdict("correct")])
    with bridge_process(settings, log_path) as bridge:
        found = wait_for(lambda: len(corrections(settings)) == 2 and corrections(settings), "the poll", 120, log_path)
        stop_process(bridge)
    assert sorted(c.case_id for c in found) == ["case-live", "case-missed"]


def _task_or_none(settings: Settings, case_id: str) -> dict[str, Any] | None:
    try:
        return task_of(settings, "detect", case_id)
    except (ValueError, StopIteration):
        return None


class Died(Exception):
    """The bridge process dying at a chosen point."""


class DiesAfterSending:
    """The real producer, in a process that dies right after the broker acknowledged its `deadly`th send: before
    the bridge could complete the case or mark the annotation version done."""

    def __init__(self, producer: Any, deadly: int):
        self.producer = producer
        self.deadly = deadly
        self.sends = 0

    async def partitions_for(self, topic: str) -> set[int]:
        partitions: set[int] = await self.producer.partitions_for(topic)
        return partitions

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, partition: int) -> Any:
        sent = await self.producer.send_and_wait(topic, value=value, key=key, partition=partition)
        self.sends += 1
        if self.sends == self.deadly:
            raise Died
        return sent


async def sync_until_death(settings: Settings, deadly: int) -> int:
    """One pass of a bridge that dies after its `deadly`th send; returns the unconfirmed sends it left."""
    from aiokafka import AIOKafkaProducer

    from schemas.connections import aiokafka_options, redis_client
    from streams.review.labelstudio import Bridge, BridgeStore, kafka_read_back, labelstudio_client, read_image_size
    from streams.review.queue import CorrectionQueue

    redis = redis_client(settings)
    producer = AIOKafkaProducer(**aiokafka_options(settings.kafka), acks="all")
    await producer.start()
    queue_name = settings.streams.review_queue
    store = BridgeStore(redis, queue_name)
    try:
        async with labelstudio_client(settings) as client:
            bridge = Bridge(
                settings, CorrectionQueue(redis, queue_name), store, client, DiesAfterSending(producer, deadly),
                kafka_read_back(settings), read_image_size(settings),
            )  # fmt: skip
            await bridge.setup()
            with pytest.raises(Died):
                await bridge.sync_once()
        return len(await store.pending())
    finally:
        await producer.stop()
        await redis.aclose()


def test_a_bridge_killed_mid_sync_and_restarted_publishes_no_duplicate(ls_settings: Settings, tmp_path: Path) -> None:
    uri = put_image(ls_settings, "ls/kill.png")
    names = [f"kill{index}" for index in range(8)]
    enqueue(ls_settings, *(hard_case(name, uri, output=DETECTED, priority=100 + i) for i, name in enumerate(names)))
    assert once(ls_settings)["imported"] == len(names)
    for name in names:
        task = task_of(ls_settings, "detect", f"case-{name}")
        annotate(ls_settings, task["id"], [task["predictions"][0]["result"][0], verdict("correct")])

    # 1. Dead right after the broker acknowledged the third correction: it is on the topic, its case still claimed.
    assert asyncio.run(sync_until_death(ls_settings, deadly=3)) == 1, "one send is left unconfirmed"
    assert len(corrections(ls_settings)) == 3
    # 2. Restarted, and killed (SIGKILL) as soon as it published anything more.
    log_path = tmp_path / "bridge.log"
    with bridge_process(ls_settings, log_path) as bridge:
        wait_for(lambda: len(corrections(ls_settings)) > 3, "a correction after the restart", 120, log_path)
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
    assert "was published before the stop" in log_path.read_text(), "the unconfirmed send was found on the topic"
    published_before = len(corrections(ls_settings))
    # 3. Restarted again: it finishes, and every case has exactly one correction.
    with bridge_process(ls_settings, log_path) as bridge:
        wait_for(lambda: queue_stats(ls_settings).submitted == len(names), "every case done", 180, log_path)
        stop_process(bridge)
    found = corrections(ls_settings)
    counts = {name: sum(c.case_id == f"case-{name}" for c in found) for name in names}
    assert counts == dict.fromkeys(names, 1), f"{published_before} before the kill; per case: {json.dumps(counts)}"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
"""Debian's chromium, headless, with no traffic of its own (this machine's network is closed)."""
IMAGE = "img[alt=image]"
"""The image Label Studio's editor draws (scaled, under its canvas of regions)."""
SCREENSHOT_ENV = "VLMFLOW_LABELSTUDIO_SCREENSHOT"
"""Where the browser test also saves its screenshot (docs/labelstudio-review.png was taken this way)."""


def test_a_reviewer_moves_a_box_in_the_browser_and_the_golden_record_shows_it(
    ls_settings: Settings, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    uri = put_image(ls_settings, "ls/browser.png")
    enqueue(ls_settings, hard_case("browser", uri, output=DETECTED, sized=False))
    assert once(ls_settings)["imported"] == 1, "the image size is read from the store when the log has none"
    task = task_of(ls_settings, "detect", "case-browser")
    project_id = task["project"]
    ls = ls_settings.labelstudio
    screenshot = tmp_path / "labelstudio-review.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1600, "height": 1100},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            # Log in.
            page.goto(f"{ls.url}/user/login/")
            page.fill("input[name=email]", ls.username)
            page.fill("input[name=password]", ls.password.get_secret_value())
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            # Open the task: the image and the model's two boxes, labelled cat and other.
            page.goto(f"{ls.url}/projects/{project_id}/data?task={task['id']}")
            image = page.locator(IMAGE).first
            page.wait_for_function(
                f"() => {{ const i = document.querySelector({IMAGE!r}); return i && i.naturalWidth; }}"
            )
            assert page.evaluate(f"() => document.querySelector({IMAGE!r}).naturalWidth") == 640
            page.get_by_text("cat", exact=True).last.wait_for()
            assert page.get_by_text("other", exact=True).count() >= 1
            # Move the cat box 64 image pixels right: the image is drawn scaled, its box on screen gives the scale.
            box = image.bounding_box()
            assert box is not None
            scale = box["width"] / 640
            x, y = box["x"] + 180 * scale, box["y"] + 160 * scale
            page.mouse.move(x, y)
            page.mouse.down()
            for step in range(1, 17):
                page.mouse.move(x + 64 * scale * step / 16, y)
            page.mouse.up()
            # Pick the verdict and submit.
            page.locator('input[name="wrong"]').first.check()
            page.screenshot(path=str(screenshot))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_function(
                f"() => fetch('/api/tasks/{task['id']}/').then(r => r.json()).then(t => t.total_annotations === 1)"
            )
        finally:
            browser.close()
    if target := os.environ.get(SCREENSHOT_ENV):
        Path(target).write_bytes(screenshot.read_bytes())

    env = review_env(ls_settings, ls_settings.streams.review_queue)
    with golden_worker(env, tmp_path / "golden.log") as worker:
        assert once(ls_settings)["published"] == 1
        (record,) = golden_records(ls_settings, 1, worker, tmp_path / "golden.log", timeout_s=240)
    boxes = {item["label"]: item["bbox_xyxy"] for item in record.answer["objects"]}
    for got, want in ((boxes["cat"], [164, 80, 324, 240]), (boxes["truck"], [380, 200, 560, 400])):
        assert all(abs(g - w) <= 1 for g, w in zip(got, want, strict=True)), (got, want)
