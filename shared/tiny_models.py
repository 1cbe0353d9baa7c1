"""The tiny random Llama of the tests and the control-plane benchmark, built offline from a seed.

A byte-level BPE tokenizer is trained here on embedded text to exactly ``TINY_VOCAB_SIZE`` tokens
(every byte has its own token, so multi-byte characters split across tokens), with BOS/EOS and a
ChatML-like chat template stored in tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SEED = 1234
TINY_TIED_SEED = 4321
TINY_VOCAB_SIZE = 384
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID = 0, 1, 2
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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


def train_tokenizer():
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
    train_tokenizer().save_pretrained(str(out_dir), save_jinja_files=False)
    return out_dir


def use_legacy_rope_keys(model_dir: Path) -> None:
    """Rewrite config.json's ``rope_parameters`` as the legacy ``rope_theta`` + ``rope_scaling``."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2, sort_keys=True))



def build_tiny_model_tied(out_dir: Path, seed: int) -> Path:
    """The tied-embedding variant with llama3 RoPE scaling, config.json in the legacy key layout."""
    build_tiny_model(out_dir, seed, tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE})
    use_legacy_rope_keys(out_dir)
    return out_dir


def load_tiny_base(model_dir: Path):
    """A saved tiny model in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
