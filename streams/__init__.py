"""The flywheel and the tools around it, in four parts that share almost nothing but `schemas`:

- `streams.flywheel`: the Faust app and the pure steps its agents call (normalize, rules, PII, dedupe, mining,
  golden records).
- `streams.review`: the correction queue in Redis, submitting corrections, a stronger model's suggestions.
- `streams.dataset`: seeded, mixed LLaMA-Factory exports of the golden set and negatives.
- `streams.ops`: replay, consumer-group resets, lag, tail and describe (kafka-python, no Faust).

`streams.cluster` is the kafka-python reading that review, the golden set and ops share ("assign all, seek").
"""
