"""tandem's model runtime: model, paged KV cache, attention, sampling, scheduling, weight loading."""

from engine.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.errors import CapacityError, InvalidRequestError, ModelConfigError, ModelFetchError, TandemError
from engine.sampling_params import SamplingParams

__all__ = ["CacheConfig", "DeviceConfig", "EngineConfig", "ModelConfig", "SchedulerConfig", "SamplingParams",
           "TandemError", "InvalidRequestError", "ModelConfigError", "ModelFetchError", "CapacityError",
           "LLMEngine"]


def __getattr__(name):
    if name == "LLMEngine":  # lazy: importing engine's config must not import torch
        from engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
