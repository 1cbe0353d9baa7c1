"""The multi-LoRA kernels on one device: checked against the plain-torch reference, then timed
against the torch path they replace, at decode sizes of the engine bench's model.

Every case runs each backend (BGMV: padded to the batch's max rank; MBGMV: each adapter at its
own rank) through ``services.gpu_worker.lora_ops`` twice: with the device's kernel (Triton on
CUDA) and with ``use_native=False`` (the torch pad/cat/bmm and segment-loop paths).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.gpu_worker.lora_ops import LoraBatch, bgmv, lora_reference, mbgmv, token_adapters

CHECK_RANKS = (1, 8, 0, 16, 64)  # rank 1, mixed ranks, an adapter without weights on the projection
CHECK_SEGMENTS = ((2, 5, 0), (5, 25, 1), (25, 27, 2), (30, 31, 3), (31, 37, 4))  # tokens 0-1, 27-29, 37-39: none
CHECK_TOKENS, CHECK_IN, CHECK_OUT = 40, 80, 72
TIMED_SHAPES = ((576, 576), (576, 1536), (1536, 576))  # SmolLM2-135M: q/o, gate/up, down
TIMED_RANKS = (8, 16, 32, 64)


@dataclass(frozen=True)
class KernelCase:
    """``tokens`` decode tokens spread over ``adapters`` adapters (ranks cycling ``TIMED_RANKS``)."""

    fan_in: int
    fan_out: int
    tokens: int
    adapters: int


def _weights(ranks, fan_in: int, fan_out: int, dtype, device, gen) -> tuple[list, list]:
    A = [(torch.randn(fan_in, r, generator=gen) * 0.1).to(device, dtype) for r in ranks]
    B = [(torch.randn(r, fan_out, generator=gen) * 0.1).to(device, dtype) for r in ranks]
    return A, B


def check(device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Largest error of each backend's kernel against :func:`lora_reference` (float32), on tokens
    with mixed ranks, rank 1, an adapter without weights and tokens without an adapter."""
    gen = torch.Generator().manual_seed(0)
    A, B = _weights(CHECK_RANKS, CHECK_IN, CHECK_OUT, dtype, device, gen)
    segs = torch.tensor(CHECK_SEGMENTS, dtype=torch.int64)
    x = torch.randn(CHECK_TOKENS, CHECK_IN, generator=gen).to(device, dtype)
    owner = token_adapters(segs, CHECK_TOKENS)
    out = {}
    for name, op, pad in (("bgmv", bgmv, max(CHECK_RANKS)), ("mbgmv", mbgmv, 0)):
        y = torch.zeros(CHECK_TOKENS, CHECK_OUT, dtype=dtype, device=device)
        op(y, x, LoraBatch.of(segs, A, B))
        ref = lora_reference(x.float().cpu(), owner, [a.float().cpu() for a in A], [b.float().cpu() for b in B], pad)
        err = (y.float().cpu() - ref).abs().max().item()
        tol = 2e-2 * max(1.0, ref.abs().max().item())
        out[name] = {"max_abs_error": err, "tolerance": tol, "pass": err <= tol}
    return out


def _timer(device: str) -> Callable[[Callable[[], None], int], float]:
    """Seconds per call of ``fn`` (best of 5 batches of ``n`` calls), synchronizing CUDA around each batch."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def time_it(fn: Callable[[], None], n: int) -> float:
        fn()
        sync()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            best = min(best, (time.perf_counter() - start) / n)
        return best

    return time_it


def time_case(case: KernelCase, device: str, calls: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """µs per call of each backend with the device's kernel and with the torch path, and their ratio."""
    gen = torch.Generator().manual_seed(1)
    ranks = [TIMED_RANKS[i % len(TIMED_RANKS)] for i in range(case.adapters)]
    A, B = _weights(ranks, case.fan_in, case.fan_out, dtype, device, gen)
    per = case.tokens // case.adapters
    segs = torch.tensor([(u * per, (u + 1) * per, u) for u in range(case.adapters)], dtype=torch.int64)
    x = torch.randn(case.tokens, case.fan_in, generator=gen).to(device, dtype)
    y = torch.zeros(case.tokens, case.fan_out, dtype=dtype, device=device)
    batch, time_it = LoraBatch.of(segs, A, B), _timer(device)
    row = {"fan_in": case.fan_in, "fan_out": case.fan_out, "tokens": case.tokens, "adapters": case.adapters}
    for name, op in (("bgmv", bgmv), ("mbgmv", mbgmv)):
        kernel = time_it(lambda: op(y, x, batch), calls)
        torch_path = time_it(lambda: op(y, x, batch, use_native=False), calls)
        row[name] = {"kernel_us": kernel * 1e6, "torch_us": torch_path * 1e6, "speedup": torch_path / kernel}
    return row
