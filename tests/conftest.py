"""Shared test fixtures: a tiny random Llama (two variants), PEFT adapters made by peft, bad adapters.

Everything is built offline from seeds, once per session:

* ``tiny_model_dir``: fp32 Llama, GQA (4 query heads, 2 KV heads, hidden 64, 3 layers), untied
  lm_head, default RoPE, plus a byte-level BPE tokenizer trained here on embedded text.
* ``tiny_model_dir_tied``: the same shape with tied embeddings and llama3 RoPE scaling; its
  config.json uses the legacy ``rope_scaling`` + ``rope_theta`` keys found in real Llama 3 checkpoints.
* ``tiny_adapters``: valid PEFT LoRA adapters on ``tiny_model_dir`` (ranks 8-64, various targets).
* ``bad_adapters``: one directory per rejection case, plus ``mismatched_base`` (valid, warn only).
* ``smollm2_dir``: the converted default model (converted on first use, ~20 s, then cached).

LoRA weights are overwritten with seeded random values sized so that each adapted projection
moves by about half of the base projection's output, after scaling: a wrong ``alpha/r`` (or
``alpha/sqrt(r)``) visibly changes the logits.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB_SIZE = 384
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID = 0, 1, 2
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RELATIVE_SIZE = 0.5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

TRAINING_TEXT = """\
The small model reads a sentence and guesses the next word. It is not clever, but it is quick,
and it never gets tired. Every morning the server wakes up, loads its weights, and waits for the
first request. A request arrives with a prompt and the name of an adapter. The adapter is a thin
layer of extra numbers that bends the model toward one task: writing poems, answering questions
about trains, or summarising long reports about the weather.
When many people ask at the same time, the server puts their requests together into one batch.
Each request keeps its own adapter, so the batch mixes many small changes on top of one large
model. Some adapters are already in memory; others must be copied from the disk first. While an
adapter is still loading, the processor helps by computing the extra numbers for the first pass.
Then the accelerator takes over and the answer streams back, one token after another.
Rivers run down to the sea, and the sea rises into clouds that drift over the hills. In spring
the fields turn green, farmers plant seeds in long straight rows, and children walk to school
along the river bank. In summer the days are long and warm; people sit outside in the evening and
talk until the stars come out. Autumn brings rain and wind, apples and pumpkins, and the first
cold mornings. In winter the lakes freeze, the roads are white with snow, and the houses glow
with yellow light behind their windows.
A good recipe for bread needs flour, water, salt and yeast. Mix them, knead the dough for ten
minutes, let it rest for an hour, shape it, and bake it in a hot oven until the crust is brown.
The kitchen will smell wonderful. Share the bread with your friends and neighbours.
Numbers help us count and measure: one, two, three, four, five, six, seven, eight, nine, ten.
A hundred is ten times ten, and a thousand is ten times a hundred. Time is measured in seconds,
minutes, hours, days, weeks, months and years. Distance is measured in metres and kilometres.
Questions and answers: What is the capital of France? Paris is the capital of France. Which
planet is the largest? Jupiter is the largest planet. How many legs does a spider have? A spider
has eight legs. Why is the sky blue? Sunlight is scattered by the air, and blue light is
scattered the most. Who wrote the letter? The teacher wrote the letter to the parents.
The library is quiet in the afternoon. Students read books about history, science, music and
art. An old clock on the wall ticks slowly, and a cat sleeps on the warm stone by the window.
Symbols and code: x = y + 1; if (a < b) { return a; } else { return b; } list[0], dict["key"].
Caf\u00e9, na\u00efve, \u00fcber, se\u00f1or, \u00e5ngstr\u00f6m, \u65e5\u672c\u8a9e, \u043f\u0440\u0438\u0432\u0435\u0442, \U0001f600.
"""


def _train_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with exactly TINY_VOCAB_SIZE tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    backend.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    assert backend.get_vocab_size() == TINY_VOCAB_SIZE, backend.get_vocab_size()
    assert backend.token_to_id("<s>") == TINY_BOS_ID and backend.token_to_id("</s>") == TINY_EOS_ID
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", TINY_BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", model_max_length=512)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(**overrides):
    """The tiny LlamaConfig shared by both model variants (fields overridable)."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.08,
                  bos_token_id=TINY_BOS_ID, eos_token_id=TINY_EOS_ID, pad_token_id=TINY_PAD_ID)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model(out_dir: Path, seed: int, **config_overrides) -> Path:
    """Write a seeded random fp32 Llama plus the tiny tokenizer into ``out_dir``."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).float()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):  # RMSNorm weights != 1, so ignoring them shows
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.save_pretrained(str(out_dir))
    _train_tokenizer().save_pretrained(str(out_dir), save_jinja_files=False)
    return out_dir


def use_legacy_rope_keys(model_dir: Path) -> None:
    """Rewrite config.json's ``rope_parameters`` as the legacy ``rope_theta`` + ``rope_scaling``."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), seed=1234)


@pytest.fixture(scope="session")
def tiny_model_dir_tied(tmp_path_factory) -> Path:
    out = build_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), seed=4321,
                           tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE})
    use_legacy_rope_keys(out)
    return out


# ----------------------------------------------------------------------------- adapters

ADAPTER_SPECS: dict[str, dict] = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all7_r16": dict(r=16, lora_alpha=16, target_modules=ALL_PROJECTIONS),
    "alllinear_r32": dict(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.05),
    "regex_r64": dict(r=64, lora_alpha=32, target_modules=r".*\.(q_proj|o_proj)"),
    "rslora_r16": dict(r=16, lora_alpha=8, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "pattern_r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"down_proj": 16, "model.layers.1.self_attn.q_proj": 4},
                       alpha_pattern={"down_proj": 64, "v_proj": 2}),
    "layers_r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                       layers_to_transform=[0, 2], layers_pattern="layers"),
}

BAD_PEFT_SPECS: dict[str, dict] = {
    "dora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules_to_save": dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora_embed_tokens": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    "lora_lm_head": dict(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj"]),
    "bias": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    "rank_too_high": dict(r=128, lora_alpha=128, target_modules=["q_proj", "v_proj"]),
}
MISMATCHED_BASE_NAME = "HuggingFaceTB/SmolLM2-360M-Instruct"


def load_tiny_base(model_dir: Path):
    """The saved tiny model in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def randomize_lora(peft_model, seed: int, adapter_name: str = "default") -> None:
    """Overwrite every linear LoRA A/B pair with seeded values (|scaling*B*A*x| ~ 0.5 |W*x|)."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            a = module.lora_A[adapter_name].weight
            b = module.lora_B[adapter_name].weight
            base = module.get_base_layer().weight
            rank, fan_in = a.shape
            gain = float(base.std()) * math.sqrt(fan_in) * LORA_RELATIVE_SIZE / module.scaling[adapter_name]
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(fan_in))
            b.copy_(torch.randn(b.shape, generator=gen) / math.sqrt(rank) * gain)


def make_lora_adapter(base, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter (made by peft on a copy of ``base``) with random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def edit_adapter_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = load_tiny_base(tiny_model_dir)
    adapters = {}
    for seed, (name, spec) in enumerate(ADAPTER_SPECS.items(), start=100):
        adapters[name] = make_lora_adapter(base, root / name, seed, **spec)
    # peft writes "all-linear" expanded to module names; keep the literal form users may write.
    edit_adapter_config(adapters["alllinear_r32"], target_modules="all-linear")
    return adapters


def _corrupt_tensor(adapter_dir: Path, key_part: str, value: float) -> None:
    """Set element [0, 0] of the first tensor whose name contains ``key_part`` to ``value``."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if key_part in k)
    tensors[name][0, 0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _shape_mismatch_adapter(tiny_model_dir: Path, out_dir: Path) -> Path:
    """A peft adapter made on a base with intermediate_size 96 (ours has 128), claiming our base."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(7)
        other = LlamaForCausalLM(tiny_llama_config(intermediate_size=96)).eval()
    make_lora_adapter(other, out_dir, 7, r=8, lora_alpha=16, target_modules=["up_proj", "down_proj"])
    edit_adapter_config(out_dir, base_model_name_or_path=str(tiny_model_dir))
    return out_dir


def _ia3_adapter(base, out_dir: Path) -> Path:
    from peft import IA3Config, get_peft_model

    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    get_peft_model(copy.deepcopy(base), config).save_pretrained(str(out_dir))
    return out_dir


def _valid_qv_adapter(base, out_dir: Path, seed: int) -> Path:
    return make_lora_adapter(base, out_dir, seed, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def _build_edited_adapters(base, root: Path) -> dict[str, Path]:
    """Bad adapters derived from a valid one by editing files after peft saved them."""
    bad = {kind: _valid_qv_adapter(base, root / kind, 300 + i) for i, kind in enumerate(
        ("nan", "inf", "missing_weights", "corrupt_weights", "missing_config", "invalid_config",
         "mismatched_base"))}
    _corrupt_tensor(bad["nan"], "layers.1.self_attn.v_proj.lora_B", float("nan"))
    _corrupt_tensor(bad["inf"], "layers.0.self_attn.q_proj.lora_A", float("inf"))
    (bad["missing_weights"] / "adapter_model.safetensors").unlink()
    weights = bad["corrupt_weights"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad["missing_config"] / "adapter_config.json").unlink()
    (bad["invalid_config"] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    edit_adapter_config(bad["mismatched_base"], base_model_name_or_path=MISMATCHED_BASE_NAME)
    return bad


@pytest.fixture(scope="session")
def bad_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """kind -> adapter dir; every kind must be rejected except ``mismatched_base`` (warn only)."""
    root = tmp_path_factory.mktemp("bad_adapters")
    base = load_tiny_base(tiny_model_dir)
    bad = {kind: make_lora_adapter(base, root / kind, 200 + i, **spec)
           for i, (kind, spec) in enumerate(BAD_PEFT_SPECS.items())}
    bad["shape_mismatch"] = _shape_mismatch_adapter(tiny_model_dir, root / "shape_mismatch")
    bad["not_lora"] = _ia3_adapter(base, root / "not_lora")
    bad.update(_build_edited_adapters(base, root))
    return bad


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bf16 default model (SmolLM2-135M-Instruct), converted from GGUF on first use."""
    from shared.model_store import default_model_dir

    return default_model_dir()


@pytest.fixture
def scratch_copy(tmp_path):
    """Copy a directory into this test's tmp dir, so a test may damage it freely."""
    def copy_dir(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / src.name))
    return copy_dir
