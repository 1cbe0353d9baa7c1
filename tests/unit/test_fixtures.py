"""The shared fixtures are what they claim: tiny models, adapters that matter, adapters that are bad."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from tests.hf_reference import HFReference, hf_reference
from tests.tiny_adapters import ALL_PROJECTIONS, MISMATCHED_BASE_NAME
from shared.tiny_models import TINY_SEED, build_tiny_model, load_tiny_base

PROMPT = [1, 40, 41, 42, 77, 120, 200, 250, 300, 17, 5, 99]


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_adapters):
    return HFReference(tiny_model_dir, tiny_adapters)


# ----------------------------------------------------------------------------- tiny models

def test_tiny_model_shape(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
    assert config["intermediate_size"] == 128 and config["num_hidden_layers"] == 3
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 512
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert not torch.allclose(norm, torch.ones_like(norm))
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_tiny_model_is_deterministic(tiny_model_dir, tmp_path):
    rebuilt = build_tiny_model(tmp_path, seed=TINY_SEED)
    assert (rebuilt / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    original, again = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_tied_variant_has_no_lm_head_and_llama3_rope(tiny_model_dir_tied):
    from transformers import AutoConfig

    config = json.loads((tiny_model_dir_tied / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "rope_parameters" not in config
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 10000.0
    with safe_open(str(tiny_model_dir_tied / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert AutoConfig.from_pretrained(str(tiny_model_dir_tied)).rope_parameters["factor"] == 8.0


def test_llama3_rope_changes_long_prompts(tiny_model_dir_tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    prompt = torch.arange(3, 203).remainder(380).unsqueeze(0) + 3
    scaled = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir_tied)).eval()
    plain_config = AutoConfig.from_pretrained(str(tiny_model_dir_tied))
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir_tied), config=plain_config).eval()
    with torch.inference_mode():
        diff = (scaled(prompt).logits - plain(prompt).logits).abs().max()
    assert diff > 1e-2


# ----------------------------------------------------------------------------- valid adapters

def test_adapter_set_covers_the_variants(tiny_adapters):
    configs = {name: adapter_config(path) for name, path in tiny_adapters.items()}
    assert len(configs) >= 6
    assert {8, 16, 32, 64} <= {c["r"] for c in configs.values()}
    targets = [c["target_modules"] for c in configs.values()]
    assert "all-linear" in targets and r".*\.(q_proj|o_proj)" in targets
    assert any(isinstance(t, list) and sorted(t) == sorted(ALL_PROJECTIONS) for t in targets)
    assert any(isinstance(t, list) and sorted(t) == ["q_proj", "v_proj"] for t in targets)
    assert any(c["use_rslora"] for c in configs.values())
    assert any(c["lora_alpha"] != c["r"] for c in configs.values())
    assert any(c["rank_pattern"] and c["alpha_pattern"] for c in configs.values())
    assert any(c["layers_to_transform"] for c in configs.values())


def test_adapter_weights_are_nonzero_and_finite(tiny_adapters, tiny_model_dir):
    for name, path in tiny_adapters.items():
        assert adapter_config(path)["base_model_name_or_path"] == str(tiny_model_dir), name
        for key, tensor in adapter_tensors(path).items():
            assert torch.isfinite(tensor).all(), (name, key)
            assert tensor.abs().max() > 0, (name, key)


def test_rank_pattern_and_layers_to_transform(tiny_adapters):
    pattern = adapter_tensors(tiny_adapters["pattern_r8"])
    assert pattern["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert pattern["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert pattern["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"].shape == (64, 16)
    layers = adapter_tensors(tiny_adapters["layers_r16"])
    assert {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in layers} == {0, 2}


def test_every_adapter_changes_the_output(reference, tiny_adapters):
    base = reference.generate(PROMPT, None, 1)
    for name in tiny_adapters:
        adapted = reference.generate(PROMPT, name, 1)
        assert (adapted.last_logits - base.last_logits).abs().max() > 0.2, name


def test_wrong_scaling_would_be_visible(reference, tiny_adapters):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in reference.model.modules() if isinstance(m, LoraLayer)]
    for name in tiny_adapters:
        right = reference.generate(PROMPT, name, 1).last_logits
        for layer in layers:
            if name in layer.scaling:
                layer.scaling[name] *= 2
        try:
            wrong = reference.generate(PROMPT, name, 1).last_logits
        finally:
            for layer in layers:
                if name in layer.scaling:
                    layer.scaling[name] /= 2
        assert (wrong - right).abs().max() > 0.1, name


# ----------------------------------------------------------------------------- the reference itself

def _plain_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full recomputation (no KV cache), the slow obvious way."""
    ids, rows = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            row = model(input_ids=torch.tensor([ids])).logits[0, -1]
            rows.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt):], torch.stack(rows)


def _expected_scaling(config: dict, module: str, rank: int) -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA), alpha_pattern matched like PEFT's keys."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config["use_rslora"] else rank)


def _merged_model(model_dir: Path, adapter_dir: Path):
    """The base model with W += scaling * B @ A folded in by hand from the adapter files."""
    model = load_tiny_base(model_dir)
    config, tensors = adapter_config(adapter_dir), adapter_tensors(adapter_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            params[module + ".weight"] += _expected_scaling(config, module, a.shape[0]) * (b @ a)
    return model


def test_base_requests_match_plain_transformers(reference, tiny_model_dir):
    tokens, rows = _plain_greedy(load_tiny_base(tiny_model_dir), PROMPT, 6)
    result = reference.generate(PROMPT, None, 6)
    assert result.token_ids == tokens
    torch.testing.assert_close(result.step_logits, rows, rtol=1e-4, atol=1e-4)


def test_adapter_requests_match_hand_merged_weights(reference, tiny_model_dir, tiny_adapters):
    for name, path in tiny_adapters.items():
        tokens, rows = _plain_greedy(_merged_model(tiny_model_dir, path), PROMPT, 4)
        result = reference.generate(PROMPT, name, 4)
        assert result.token_ids == tokens, name
        torch.testing.assert_close(result.step_logits, rows, rtol=1e-4, atol=1e-4, msg=name)


def test_results_do_not_depend_on_request_order(tiny_model_dir, tiny_adapters):
    names = ["qv_r8", "rslora_r16", None, "pattern_r8"]
    requests = [(PROMPT[: 6 + i], name, 3) for i, name in enumerate(names)]
    forward = hf_reference(tiny_model_dir, tiny_adapters, requests)
    backward = hf_reference(tiny_model_dir, tiny_adapters, requests[::-1])[::-1]
    for one, other in zip(forward, backward):
        assert one.token_ids == other.token_ids and len(one.token_ids) == 3
        assert torch.equal(one.step_logits, other.step_logits)


def test_reference_stops_at_eos_and_rejects_unknown_adapter(reference):
    first = reference.generate(PROMPT, "qv_r8", 1).token_ids[0]
    assert reference.generate(PROMPT, "qv_r8", 5, eos_token_id=first).token_ids == [first]
    with pytest.raises(KeyError, match="nope"):
        reference.generate(PROMPT, "nope", 1)


# ----------------------------------------------------------------------------- bad adapters

def _keys(adapter_dir: Path) -> list[str]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _check_dora(d: Path) -> None:
    assert adapter_config(d)["use_dora"] and any("lora_magnitude_vector" in k for k in _keys(d))


def _check_modules_to_save(d: Path) -> None:
    assert adapter_config(d)["modules_to_save"] == ["lm_head"]
    assert "base_model.model.lm_head.weight" in _keys(d)


def _check_lora_embed_tokens(d: Path) -> None:
    assert any("embed_tokens.lora_embedding_A" in k for k in _keys(d))


def _check_lora_lm_head(d: Path) -> None:
    assert any("lm_head.lora_A" in k for k in _keys(d))


def _check_bias(d: Path) -> None:
    assert adapter_config(d)["bias"] != "none"


def _check_rank_too_high(d: Path) -> None:
    assert adapter_config(d)["r"] == 128 and all(128 in t.shape for t in adapter_tensors(d).values())


def _check_shape_mismatch(d: Path, model_dir: Path) -> None:
    from peft import PeftModel

    assert adapter_config(d)["base_model_name_or_path"] == str(model_dir)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_tiny_base(model_dir), str(d))


def _check_nonfinite(d: Path, kind: str) -> None:
    bad = [k for k, t in adapter_tensors(d).items() if (t.isnan() if kind == "nan" else t.isinf()).any()]
    assert len(bad) == 1


def _check_missing(d: Path, name: str) -> None:
    assert not (d / name).exists() and any(d.iterdir())


def _check_corrupt_weights(d: Path) -> None:
    with pytest.raises(SafetensorError):
        adapter_tensors(d)


def _check_invalid_config(d: Path) -> None:
    with pytest.raises(json.JSONDecodeError):
        adapter_config(d)


def _check_not_lora(d: Path) -> None:
    assert adapter_config(d)["peft_type"] == "IA3"


def _check_mismatched_base(d: Path, model_dir: Path) -> None:
    from peft import PeftModel

    assert adapter_config(d)["base_model_name_or_path"] == MISMATCHED_BASE_NAME
    PeftModel.from_pretrained(load_tiny_base(model_dir), str(d))  # valid apart from the name


BAD_CHECKS = {
    "dora": _check_dora,
    "modules_to_save": _check_modules_to_save,
    "lora_embed_tokens": _check_lora_embed_tokens,
    "lora_lm_head": _check_lora_lm_head,
    "bias": _check_bias,
    "rank_too_high": _check_rank_too_high,
    "shape_mismatch": _check_shape_mismatch,
    "nan": lambda d: _check_nonfinite(d, "nan"),
    "inf": lambda d: _check_nonfinite(d, "inf"),
    "missing_weights": lambda d: _check_missing(d, "adapter_model.safetensors"),
    "corrupt_weights": _check_corrupt_weights,
    "missing_config": lambda d: _check_missing(d, "adapter_config.json"),
    "invalid_config": _check_invalid_config,
    "not_lora": _check_not_lora,
    "mismatched_base": _check_mismatched_base,
}
NEEDS_MODEL_DIR = {"shape_mismatch", "mismatched_base"}


def test_every_bad_adapter_kind_is_checked(bad_adapters):
    assert set(bad_adapters) == set(BAD_CHECKS)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations raised inside peft
@pytest.mark.parametrize("kind", sorted(BAD_CHECKS))
def test_bad_adapter_is_bad_as_stated(bad_adapters, tiny_model_dir, kind):
    check = BAD_CHECKS[kind]
    if kind in NEEDS_MODEL_DIR:
        check(bad_adapters[kind], tiny_model_dir)
    else:
        check(bad_adapters[kind])
