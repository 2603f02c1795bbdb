"""Model engines behind one small protocol: `VllmEngine` (workers.engines.vllm_engine, needs vLLM) and
`InstantEngine` (no model, for benchmarks and fast tests)."""

from workers.engines.base import Engine, EngineOutput, EngineRequest
from workers.engines.instant import InstantEngine

__all__ = ["Engine", "EngineOutput", "EngineRequest", "InstantEngine"]
