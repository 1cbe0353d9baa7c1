"""Configuration of the multi-LoRA engine (one dataclass per concern)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.backends import BACKEND_CHOICES, starting_backend
from shared.config import check_choice, option, require

DTYPES = ("bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    """How the engine batches, caches and computes."""

    backend: str = option("auto", "multi-LoRA kernel family: bgmv pads ranks, mbgmv does not; auto: the one the "
                                  "worker's profile predicts faster for its ranks (mbgmv until it knows)",
                          BACKEND_CHOICES)
    dtype: str = option("bfloat16", "model and activation dtype", DTYPES)
    device: str = option("auto", "cuda when available, else cpu", DEVICES)
    max_batch_size: int = option(64, "max running requests per engine step")
    max_batched_tokens: int = option(2048, "max tokens (prefill + decode) per engine step")
    max_lora_rank: int = option(64, "largest adapter rank accepted")
    block_size: int = option(16, "tokens per KV-cache block")
    num_kv_blocks: int = option(0, "KV-cache blocks; 0 sizes the cache from kv_cache_bytes")
    kv_cache_bytes: int = option(512 * 1024 * 1024, "KV-cache byte budget when num_kv_blocks is 0")
    max_model_len: int = option(0, "context limit in tokens; 0 uses the model's own")
    num_threads: int = option(0, "torch CPU threads; 0 keeps torch's default (one per core)")
    native_ops: bool = option(True, "use the compiled CPU LoRA kernel from csrc/ when it builds")
    cuda_graphs: bool = option(True, "on CUDA with native_ops, replay decode-only steps as CUDA graphs (batch sizes "
                                     "1, 2, 4, then multiples of 8 up to max_batch_size, recorded at start)")

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKEND_CHOICES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        require(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        require(self.max_batched_tokens >= 16, "max_batched_tokens must be >= 16")
        require(1 <= self.max_lora_rank <= 1024, "max_lora_rank must be in [1, 1024]")
        require(self.block_size >= 1, "block_size must be >= 1")
        require(self.num_kv_blocks >= 0, "num_kv_blocks must be >= 0")
        require(self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0")
        require(self.max_model_len >= 0, "max_model_len must be >= 0")
        require(self.num_threads >= 0, "num_threads must be >= 0")

    def starting_backend(self) -> str:
        """The kernel family the engine starts on (``auto`` starts on mbgmv)."""
        return starting_backend(self.backend)

    def resolved_device(self) -> str:
        """The torch device string this config runs on."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
