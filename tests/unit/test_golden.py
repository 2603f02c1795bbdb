"""`streams.flywheel.golden.decide`: golden versions only go forward; a redelivered or older correction writes none."""

from __future__ import annotations

from streams.flywheel.golden import Decision, GoldenState, Stamp, decide

OLD, NEW = Stamp(1_000, "a"), Stamp(2_000, "b")


def test_versions_only_go_forward() -> None:
    assert decide(None, OLD) == Decision("write", 1)
    assert decide(GoldenState(1, OLD, sent=True), NEW) == Decision("write", 2)
    assert decide(GoldenState(7, OLD, sent=True), NEW) == Decision("write", 8), "continues after a rebuilt state"


def test_a_redelivery_or_an_older_correction_writes_nothing() -> None:
    assert decide(GoldenState(2, NEW, sent=True), NEW) == Decision("redelivered", 2)
    assert decide(GoldenState(2, NEW, sent=False), NEW) == Decision("rewrite", 2)
    assert decide(GoldenState(2, NEW, sent=True), OLD) == Decision("older", 2)
    assert decide(GoldenState(2, NEW, sent=True), Stamp(3_000, "b")) == Decision("unchanged", 2)
