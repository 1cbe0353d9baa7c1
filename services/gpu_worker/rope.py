"""Rotary position embeddings, including Llama-3 style frequency scaling."""

from __future__ import annotations

import math

import torch

from services.gpu_worker.layer_ops import native
from shared.native_ops import layer_ops_kernel


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """``inv_freq: [head_dim // 2]`` (float32), rescaled per ``rope_scaling``.

    Supported ``rope_type`` values: ``default`` (or no scaling), ``linear`` and ``llama3``.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(inv, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def _llama3_scale(inv: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, smooth between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables; :meth:`apply` rotates q and k in place of HF's rotate_half."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: str) -> None:
        inv = inverse_frequencies(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.max_positions = max_positions

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q: [T, H, D]`` and ``k: [T, KVH, D]`` at ``positions: [T]``.

        On the CPU the fused kernel of ``csrc/layer_ops_cpu.cpp`` runs, with the same rounding as
        :meth:`reference`."""
        if native(q):
            kernel = layer_ops_kernel()
            return kernel.rope(q, self.cos, self.sin, positions), kernel.rope(k, self.cos, self.sin, positions)
        return self.reference(q, k, positions)

    def reference(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``q * cos + rotate_half(q) * sin`` in plain torch (same shapes as :meth:`apply`)."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
