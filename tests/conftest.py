"""Shared test fixtures: a tiny random Llama (two variants), PEFT adapters made by peft, bad adapters.

Everything is built offline from seeds, once per session (builders in shared/tiny_models.py and
tests/tiny_adapters.py; the transformers+peft ground truth is tests/hf_reference.py):

* ``tiny_model_dir``: fp32 Llama, GQA (4 query heads, 2 KV heads, head_dim 16, hidden 64,
  intermediate 128, 3 layers, vocab 384), untied lm_head, default RoPE, byte-level BPE tokenizer
  with BOS ``<s>`` (1), EOS ``</s>`` (2) and a chat template.
* ``tiny_model_dir_tied``: the same shape, tied embeddings (no lm_head.weight in the file), llama3
  RoPE scaling; its config.json uses the legacy ``rope_scaling`` + ``rope_theta`` keys of real
  Llama 3 checkpoints (transformers 5 itself writes ``rope_parameters``, as ``tiny_model_dir`` has).
* ``tiny_adapters``: name -> valid PEFT LoRA adapter dir on ``tiny_model_dir`` (tiny_adapters.ADAPTER_SPECS).
* ``bad_adapters``: kind -> adapter dir, one per rejection case, plus ``mismatched_base`` (valid
  apart from ``base_model_name_or_path``: warn only).
* ``smollm2_dir``: the converted bf16 default model (converted on first use, ~20 s, then cached).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CARASERVE_AUTO_PROFILE", "0")  # workers started by tests make no quick profile unless asked

from tests.tiny_adapters import build_adapters, build_bad_adapters  # noqa: E402
from shared.native_ops import (cpu_lora_kernel, dense_kernel, greedy_kernel, layer_ops_kernel,  # noqa: E402
                               paged_attention_kernel)
from shared.tiny_models import TINY_SEED, TINY_TIED_SEED, build_tiny_model, build_tiny_model_tied  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def native_kernels() -> None:
    """Build (or load) the native CPU kernels once, in the real cache, before any test runs.

    A clean checkout compiles each in about 20 s on a 2-core machine; that must not land inside a
    test's timed wait (a worker's start, say), nor in a test that points the cache elsewhere.
    """
    cpu_lora_kernel()
    paged_attention_kernel()
    layer_ops_kernel()
    greedy_kernel()
    dense_kernel()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_model_dir_tied(tmp_path_factory) -> Path:
    return build_tiny_model_tied(tmp_path_factory.mktemp("tiny_llama_tied"), seed=TINY_TIED_SEED)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return build_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def bad_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return build_bad_adapters(tiny_model_dir, tmp_path_factory.mktemp("bad_adapters"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bf16 default model (SmolLM2-135M-Instruct), converted from GGUF on first use."""
    from shared.model_store import default_model_dir

    return default_model_dir()


@pytest.fixture
def scratch_copy(tmp_path):
    """Copy a directory into this test's tmp dir, so the test may damage it freely."""
    def copy_dir(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / src.name))
    return copy_dir
