"""SmolLM2-135M in bf16: the engine's first 16 greedy tokens match transformers+peft (bf16)."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from tests.hf_reference import HFReference
import tests.tiny_adapters as tiny_adapters
from tests.tiny_adapters import make_lora_adapter
from tests.unit.gpu_worker.test_engine_correctness import run_engine

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "Three reasons to learn Python are",
    "Once upon a time, in a small village,",
    "The speed of light is",
    "My favourite recipe for pancakes",
    "In 1969, the first humans",
    "A good password should",
    "The quick brown fox",
]
# LoRA delta relative to the base projection's output: fine-tuned adapters change a
# projection by a few percent.
LORA_RELATIVE_SIZE = 0.05


def save_in_bf16(adapter_dir):
    """Store the adapter's weights in bf16, as bf16 training writes them.

    The engine keeps adapter weights in the model dtype (as vLLM does) while PEFT upcasts
    them to fp32; with bf16 files both see the same weights, so the comparison tests the
    engine's arithmetic rather than the rounding of fp32 files.
    """
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))
    return adapter_dir


@pytest.fixture(scope="module")
def smollm2_adapters(smollm2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2_adapters")
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.bfloat16)
    specs = {"qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "all64": dict(r=64, lora_alpha=128, target_modules="all-linear")}
    default_size = tiny_adapters.LORA_RELATIVE_SIZE
    tiny_adapters.LORA_RELATIVE_SIZE = LORA_RELATIVE_SIZE
    try:
        return {name: save_in_bf16(make_lora_adapter(base, root / name, seed, **spec))
                for seed, (name, spec) in enumerate(specs.items(), start=7)}
    finally:
        tiny_adapters.LORA_RELATIVE_SIZE = default_size


@pytest.mark.slow
@pytest.mark.timeout(900)  # transformers' bf16 generation on a 2-core CPU is slow, more so under load
def test_first_16_greedy_tokens_match_peft_bf16(smollm2_dir, smollm2_adapters):
    from shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    names = [None, "qv8", "all64"]
    requests = [(tokenizer(p)["input_ids"], names[i % 3]) for i, p in enumerate(PROMPTS)]
    engine = LLMEngine(smollm2_dir, EngineConfig(dtype="bfloat16", device="cpu"), dict(smollm2_adapters))
    got = run_engine(engine, requests, max_new=16)
    reference = HFReference(smollm2_dir, smollm2_adapters, dtype=torch.bfloat16)
    matches = [tokens == reference.generate(ids, adapter, 16).token_ids for (ids, adapter), tokens in zip(requests, got)]
    assert sum(matches) / len(matches) >= 0.9, matches
