"""Ground truth for engine correctness: transformers + peft, one request at a time, greedy.

The base model is loaded once; every adapter is loaded into one ``PeftModel`` under its own name
(``load_adapter(..., adapter_name=name)``) and selected with ``set_adapter``; requests without an
adapter run inside ``disable_adapter()``. Each request is decoded alone (no batching, no padding),
with the transformers KV cache, so the results depend on nothing but the request itself.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

Request = tuple[Sequence[int], str | None, int]


@dataclass
class ReferenceResult:
    """One request's greedy output.

    token_ids: the generated ids (``max_new_tokens`` of them, fewer if ``eos_token_id`` was hit).
    step_logits: [len(token_ids), vocab] fp32 logits that produced each generated token
    (row 0 comes from the prompt's last position).
    """

    token_ids: list[int]
    step_logits: torch.Tensor

    @property
    def last_logits(self) -> torch.Tensor:
        """[vocab] logits of the last generation step."""
        return self.step_logits[-1]


class HFReference:
    """A loaded base model (plus adapters) that answers reference requests."""

    def __init__(self, model_dir: str | Path, adapters: Mapping[str, str | Path] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.adapter_names = tuple(adapters or {})
        for index, (name, path) in enumerate((adapters or {}).items()):
            self.model = self._load_adapter(index, name, Path(path))

    def _load_adapter(self, index: int, name: str, path: Path):
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations raised inside peft
            if index == 0:
                return PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            self.model.load_adapter(str(path), adapter_name=name)
        return self.model

    def run(self, requests: Sequence[Request], eos_token_id: int | None = None) -> list[ReferenceResult]:
        """Answer (prompt_token_ids, adapter_name or None, max_new_tokens) requests in order."""
        return [self.generate(prompt, adapter, max_new, eos_token_id) for prompt, adapter, max_new in requests]

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], adapter: str | None, max_new_tokens: int,
                 eos_token_id: int | None = None) -> ReferenceResult:
        """Greedy-decode one request; stop after ``max_new_tokens`` or after ``eos_token_id``."""
        if not prompt_ids or max_new_tokens < 1:
            raise ValueError("a reference request needs a non-empty prompt and max_new_tokens >= 1")
        with self._adapter_context(adapter):
            return self._greedy(list(prompt_ids), max_new_tokens, eos_token_id)

    def _adapter_context(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self.adapter_names else contextlib.nullcontext()
        if adapter not in self.adapter_names:
            raise KeyError(f"adapter {adapter!r} was not loaded (have {', '.join(self.adapter_names)})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> ReferenceResult:
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        while True:
            step = out.logits[0, -1].float()
            logits.append(step)
            tokens.append(int(step.argmax()))
            if len(tokens) == max_new_tokens or tokens[-1] == eos_token_id:
                break
            out = self.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                             use_cache=True)
        return ReferenceResult(tokens, torch.stack(logits))


def hf_reference(model_dir: str | Path, adapters: Mapping[str, str | Path] | None,
                 requests: Sequence[Request], dtype: torch.dtype = torch.float32,
                 eos_token_id: int | None = None) -> list[ReferenceResult]:
    """Load the model and adapters, answer ``requests`` one by one (see :class:`HFReference`)."""
    return HFReference(model_dir, adapters, dtype).run(requests, eos_token_id)
