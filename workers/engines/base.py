"""The seam between the inference worker and a model engine: one request in, one output back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL.Image import Image


@dataclass(frozen=True)
class EngineRequest:
    """One image job as the engine sees it."""

    # User text of the prompt; the engine wraps it (and the images) in the model's chat template.
    prompt: str
    # Decoded images, in the order they appear in the prompt (before the text).
    images: list[Image] = field(default_factory=list)
    # JSON Schema the output must follow (constrained decoding); None leaves the output free text.
    json_schema: dict[str, Any] | None = None
    # Most tokens to generate.
    max_tokens: int = 512
    # True: every image is already at its final smart_resize size (workers.images); the engine must not resize.
    images_at_final_size: bool = False


@dataclass(frozen=True)
class EngineOutput:
    """What the engine produced for one request."""

    # Generated text, special tokens stripped.
    text: str
    # `text` parsed as JSON, or None when it does not parse (e.g. cut off at max_tokens).
    parsed_json: Any | None
    # Prompt length in tokens, image placeholder tokens included.
    num_prompt_tokens: int
    # Generated tokens.
    num_completion_tokens: int
    # Image placeholder tokens in the prompt (the vision tokens); None when the engine cannot tell.
    num_image_tokens: int | None
    # Why generation stopped: "stop" (end of sequence or schema complete), "length" (max_tokens), ...
    finish_reason: str | None
    # Seconds from submission to the first generated token; None when the engine does not stream.
    time_to_first_token_s: float | None
    # Seconds from submission to the complete output.
    latency_s: float


@dataclass(frozen=True)
class KvCache:
    """The KV cache an engine got when it started: what one GPU's budget pool may fill (workers.capacity)."""

    # Tokens it holds: whole blocks x the block size.
    tokens: int
    # Tokens per block: a sequence's last block may be partly empty.
    block_size: int
    # Sequences the engine runs at once; each keeps its text in the cache besides its images.
    max_num_seqs: int


class Engine(Protocol):
    """A model engine the worker drives. `start` once, `generate` concurrently, `close` once."""

    async def start(self) -> None:
        """Load the model; returns when `generate` can be called."""
        ...

    def kv_cache(self) -> KvCache | None:
        """After `start`: the KV cache the engine got; None for an engine that keeps none."""
        ...

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """Run one request to completion."""
        ...

    async def close(self) -> None:
        """Release the model and any processes the engine started."""
        ...
