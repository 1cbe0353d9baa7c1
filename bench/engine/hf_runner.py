"""The transformers (+ peft) baselines: static batches through ``generate``.

Requests are cut into batches of ``batch_size`` in arrival order and left-padded. Every
request of a batch generates the batch's longest output (``min_new_tokens = max_new_tokens``),
greedily; only each request's own output length counts as useful. With adapters, the batch
mixes adapters through peft's ``adapter_names`` (one name per row; ``__base__`` for none).

Token times come from a stopping criterion that ``generate`` calls after every step: the k-th
call marks when every row's k-th token exists. All requests arrive at t = 0, so a later
batch's TTFT includes the time spent waiting for the batches before it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from bench.engine.workload import BenchRequest
from bench.engine.run_record import RunRecord

BASE_ADAPTER = "__base__"
WARMUP_PROMPT_TOKENS = 16


def _step_clock(device: str, on_step):
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        """Records when each generation step finished; never stops generation."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            on_step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


def load_hf_model(model_dir: Path, adapters: dict[str, Path] | None, device: str):
    """The bf16 transformers model, wrapped in a PeftModel holding every adapter when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    if not adapters:
        return model
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        items = list(adapters.items())
        model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0]).eval()
        for name, path in items[1:]:
            model.load_adapter(str(path), adapter_name=name)
    return model.to(device)


def _pad_id(model_dir: Path) -> int:
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _generate(model, batch: list[BenchRequest], adapters: bool, pad_id: int, new_tokens: int, clock, device: str):
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch], device=device)
    extra = {"adapter_names": [r.adapter if r.adapter else BASE_ADAPTER for r in batch]} if adapters else {}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                             stopping_criteria=[clock] if clock is not None else None, **extra)
    if out.shape[1] - width != new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - width} tokens, expected {new_tokens}")


def run_hf(model_dir: Path, requests: list[BenchRequest], adapters: dict[str, Path] | None, device: str,
           threads: int, batch_size: int, label: str) -> RunRecord:
    """Serve ``requests`` in static batches with ``generate``; returns the per-request timings."""
    torch.set_num_threads(threads)
    model = load_hf_model(model_dir, adapters, device)
    pad_id = _pad_id(model_dir)
    warm = [BenchRequest("warm-up", requests[0].prompt_ids[:WARMUP_PROMPT_TOKENS], 2, requests[0].adapter)]
    _generate(model, warm, bool(adapters), pad_id, 2, None, device)
    record = RunRecord(label, {r.request_id: r.max_tokens for r in requests})
    record.start()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        clock = _step_clock(device, record.progress)
        _generate(model, batch, bool(adapters), pad_id, max(r.max_tokens for r in batch), clock, device)
        for r in batch:
            for k in range(r.max_tokens):
                record.tokens(r.request_id, 1, clock.times[k])
        record.progress(force=True)
    return record
