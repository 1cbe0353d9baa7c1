"""Numbers the engine benchmark derives: latency summaries, decode-step FLOPs and bytes, the machine's peaks.

Decode FLOPs are counted from the model shape, per decoded token:

* linear layers: ``2 * params`` of every decoder projection plus the LM head;
* LoRA: ``2 * r * (in + out)`` per adapted projection per layer, at the request's own rank
  (the useful work; BGMV's padding to the batch's max rank is not counted);
* attention: ``4 * ctx * (heads * head_dim)`` per layer (``q k^T`` and ``p v`` over ``ctx``
  cached tokens, the current one included).

Element-wise work (norms, RoPE, activation, softmax) is not counted.

Decode bytes are what one decode step must read from memory at least once:

* weights: every decoder projection and the LM head, at ``dtype_bytes`` per parameter;
* LoRA: A and B of every distinct adapter in the step (an adapter shared by several
  sequences is read once), all seven projections, every layer;
* KV cache: ``2 * ctx * kv_heads * head_dim`` values per layer per sequence.

Norm weights, embeddings of the step's few tokens and activations are not counted. The
machine's limits are measured in the same process: the bf16 matmul peak (FLOP/s) and the
memory bandwidth (bytes/s, best of a large-tensor copy and a large-tensor sum).
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Sequence
from pathlib import Path

from shared.llama_shape import PROJECTIONS, LlamaShape

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p90", "p99", "mean"}`` of ``values`` (seconds in, seconds out)."""
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values)
    return out


def linear_flops_per_token(shape: LlamaShape, vocab_size: int) -> int:
    """``2 * params`` of all decoder projections and the LM head."""
    per_layer = sum(i * o for i, o in (shape.proj_dims(p) for p in PROJECTIONS))
    return 2 * (shape.num_layers * per_layer + vocab_size * shape.hidden_size)


def lora_flops_per_token(shape: LlamaShape, rank: int, projections: Sequence[str] = PROJECTIONS) -> int:
    """``2 * r * (in + out)`` summed over the adapted projections of every layer."""
    return 2 * rank * shape.num_layers * sum(sum(shape.proj_dims(p)) for p in projections)


def attention_flops_per_token(shape: LlamaShape, context: int) -> int:
    """``4 * ctx * heads * head_dim`` per layer."""
    return 4 * context * shape.num_heads * shape.head_dim * shape.num_layers


def decode_step_flops(shape: LlamaShape, vocab_size: int, contexts: Sequence[int], ranks: Sequence[int]) -> int:
    """FLOPs of one decode step: one token per sequence at ``contexts[i]``, adapter rank ``ranks[i]`` (0 = none)."""
    base = linear_flops_per_token(shape, vocab_size)
    return sum(base + lora_flops_per_token(shape, r) + attention_flops_per_token(shape, c)
               for c, r in zip(contexts, ranks, strict=True))


def linear_bytes(shape: LlamaShape, vocab_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of all decoder projection weights and the LM head."""
    return linear_flops_per_token(shape, vocab_size) // 2 * dtype_bytes


def kv_bytes(shape: LlamaShape, context: int, dtype_bytes: int = 2) -> int:
    """Bytes of one sequence's cached keys and values over ``context`` tokens, all layers."""
    return 2 * context * shape.num_kv_heads * shape.head_dim * shape.num_layers * dtype_bytes


def decode_step_bytes(shape: LlamaShape, vocab_size: int, contexts: Sequence[int], adapter_ranks: Sequence[int],
                      dtype_bytes: int = 2) -> int:
    """Bytes one decode step reads: weights once, each distinct adapter once (``adapter_ranks``), every KV context."""
    lora = sum(lora_flops_per_token(shape, r) // 2 for r in adapter_ranks) * dtype_bytes
    return linear_bytes(shape, vocab_size, dtype_bytes) + lora + sum(kv_bytes(shape, c, dtype_bytes) for c in contexts)


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 in bytes, from sysfs (0 where sysfs does not say)."""
    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = Path(path).read_text().strip().upper()
        units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes)


def memory_bandwidth(device: str, size_bytes: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Best and median bytes/s of reading ``size_bytes`` on ``device``: the better of copy and sum.

    A copy moves ``2 * size`` bytes (read + write), a sum reads ``size``; each is timed best of
    ``repeats`` after a warm-up, on a float32 tensor far larger than the caches (default 2 GiB
    on CUDA; on CPU four times the last-level cache and at least 1 GiB: a 256 MiB tensor fits
    the 300 MiB L3 of the machine this project is measured on and read at about 1.7x DRAM's rate).
    The kind with the higher best rate is reported.
    """
    import torch

    default = 2 * 1024 ** 3 if device.startswith("cuda") else max(1024 ** 3, 4 * last_level_cache_bytes())
    n = (size_bytes or default) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    kinds = {"copy": (lambda: dst.copy_(src), 2 * 4 * n), "sum": (lambda: src.sum(), 4 * n)}
    rates = {}
    with torch.inference_mode():
        for kind, (op, moved) in kinds.items():
            op()  # warm-up (page faults, thread pool start)
            times = []
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                op()
                sync()
                times.append(time.perf_counter() - start)
            rates[kind] = (moved / min(times), moved / percentile(times, 50))
    best = max(rates, key=lambda k: rates[k][0])
    return {"size_bytes": 4 * n, "kind": best, "best_bytes_per_s": rates[best][0],
            "median_bytes_per_s": rates[best][1], **{f"{k}_best_bytes_per_s": v[0] for k, v in rates.items()}}


def matmul_peak(device: str, size: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Best and median FLOP/s of a square bf16 ``torch.matmul`` (``size`` x ``size``) on ``device``."""
    import torch

    n = size or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up (library init, kernel selection)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            times.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    return {"size": n, "best_flops_per_s": flops / min(times), "median_flops_per_s": flops / percentile(times, 50)}
