"""Engine limits derived from the settings: the start-time check, max_num_seqs from the KV cache, and the
admission check of one job's text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.settings import Settings, load_settings
from workers.limits import (
    CHAT_TEMPLATE_TOKENS,
    GPU_MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    TEXT_SHARE,
    LimitsConflict,
    TooManyTokens,
    check_job,
    derive_limits,
    largest_image_tokens,
    text_tokens_bound,
)


def settings(**engine: object) -> Settings:
    base = load_settings()
    return base.model_copy(update={"engine": base.engine.model_copy(update=engine)})


def test_the_defaults_hold_four_of_the_largest_images_and_the_most_text() -> None:
    limits = derive_limits(settings(), None)
    assert limits.image_tokens == 1_280  # max_pixels 1,003,520 / 28^2
    assert limits.text_reserve == 4 * 2 + CHAT_TEMPLATE_TOKENS + 1_024 + 1_024
    assert limits.largest_job == 4 * 1_280 + limits.text_reserve <= limits.max_model_len == 8_192


def test_a_context_too_short_for_the_largest_job_refuses_to_start_with_one_line() -> None:
    with pytest.raises(LimitsConflict) as refused:
        derive_limits(settings(max_model_len=4_096), None)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("engine.max_model_len 4,096 cannot hold the largest job the settings allow: 4 images")
    assert "= 7,284" in message


def test_fewer_images_or_pixels_make_a_short_context_fit() -> None:
    assert derive_limits(settings(max_model_len=4_096, limit_images_per_prompt=1), None).largest_job <= 4_096
    base = load_settings()
    small = base.model_copy(update={"model": base.model.model_copy(update={"max_pixels": 200_704})})
    assert largest_image_tokens(small) == 256


def test_cuda_steps_take_8192_tokens_and_cpu_keeps_vllms_default() -> None:
    assert derive_limits(settings(device="cuda"), None).max_num_batched_tokens == GPU_MAX_NUM_BATCHED_TOKENS
    assert derive_limits(settings(), None).max_num_batched_tokens is None
    assert derive_limits(settings(device="cuda", max_num_batched_tokens=16_384), None).max_num_batched_tokens == 16_384


def test_max_num_seqs_fits_the_text_of_all_sequences_in_a_share_of_the_kv_cache() -> None:
    limits = derive_limits(settings(device="cuda"), 990_000)
    assert limits.max_num_seqs == int(TEXT_SHARE * 990_000 / limits.text_reserve) == 228
    assert limits.max_num_seqs * limits.text_reserve <= TEXT_SHARE * 990_000
    assert derive_limits(settings(device="cuda"), 10**9).max_num_seqs == MAX_NUM_SEQS["cuda"]
    assert derive_limits(settings(), None).max_num_seqs == MAX_NUM_SEQS["cpu"]
    assert derive_limits(settings(max_num_seqs=7), 990_000).max_num_seqs == 7


def test_a_kv_cache_too_small_for_one_sequence_refuses_to_start() -> None:
    with pytest.raises(LimitsConflict, match="cannot hold the text of one sequence"):
        derive_limits(settings(), 1_000)


def test_a_job_over_the_text_room_gets_too_many_tokens() -> None:
    limits = derive_limits(settings(max_prompt_tokens=100, max_output_tokens=64), None)
    check_job(limits, "x" * 100, 64)
    with pytest.raises(TooManyTokens, match="prompt text is up to 101 tokens") as refused:
        check_job(limits, "x" * 101, 64)
    assert refused.value.code == "too_many_tokens"
    with pytest.raises(TooManyTokens, match="max_output_tokens 65 is over the engine's 64"):
        check_job(limits, "short", 65)


def test_the_text_bound_counts_bytes_after_nfc() -> None:
    assert text_tokens_bound("abc") == 3
    assert text_tokens_bound("é") == 2  # one code point, two UTF-8 bytes
    assert text_tokens_bound("e\u0301") == 2  # NFC composes e + combining acute into é


def test_a_worker_with_conflicting_limits_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLMFLOW_")}
    env["VLMFLOW_ENGINE__MAX_MODEL_LEN"] = "4096"
    for engine in ("instant", "sim"):
        started = subprocess.run(
            [sys.executable, "-m", "vlmflow.cli", "worker", "--engine", engine],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 2, started.stderr
        (line,) = started.stderr.strip().splitlines()
        assert line.startswith("vlmflow: error: engine.max_model_len 4,096 cannot hold the largest job"), line
