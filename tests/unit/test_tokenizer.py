"""Tokenizer loading, chat templating and incremental detokenization."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from shared.tokenizer import (REPLACEMENT_CHAR, ChatTemplateError, IncrementalDetokenizer, TokenizerError,
                              apply_chat_template, encode_prompt, load_tokenizer)

MIXED_TEXT = "Grüße, señor! 日本語 😀 and caf\u00e9 \U0001f680x"


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]


def test_load_tokenizer_is_fast_and_matches_model(tiny_tokenizer, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert isinstance(tiny_tokenizer, PreTrainedTokenizerFast)
    assert len(tiny_tokenizer) == config["vocab_size"]
    assert tiny_tokenizer.eos_token_id == config["eos_token_id"]
    assert tiny_tokenizer.bos_token_id == config["bos_token_id"]


@pytest.mark.parametrize("text", ["Why is the sky blue?", MIXED_TEXT, "  two  spaces\nand a newline", "x"])
@pytest.mark.parametrize("special", [True, False])
def test_encode_prompt_matches_transformers(tiny_tokenizer, text, special):
    expected = tiny_tokenizer.encode(text, add_special_tokens=special)
    assert encode_prompt(tiny_tokenizer, text, add_special_tokens=special) == expected
    if special:
        assert expected[0] == tiny_tokenizer.bos_token_id  # the post-processor's BOS is kept


def test_load_tokenizer_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_chat_template_renders_once_with_bos(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    ids = apply_chat_template(tiny_tokenizer, messages)
    assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id
    text = tiny_tokenizer.decode(ids)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_missing(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template") as err:
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("messages", [[], "hello", [3], [{"role": "user"}], [{"role": 1, "content": "x"}],
                                      [{"role": "user", "content": None}]])
def test_chat_template_rejects_malformed_messages(tiny_tokenizer, messages):
    with pytest.raises(ChatTemplateError):
        apply_chat_template(tiny_tokenizer, messages)


def test_chat_template_error_is_wrapped(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_reproduces_decode_without_partial_chars(tiny_tokenizer, chunk):
    prompt = tiny_tokenizer.encode("The prompt says:")
    ids = tiny_tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == MIXED_TEXT == detok.text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert detok.flush() == ""


def test_partial_utf8_is_held_back(tiny_tokenizer):
    ids = tiny_tokenizer.encode("\U0001f680", add_special_tokens=False)
    assert len(ids) == 4  # one byte per token in the tiny vocabulary
    detok = IncrementalDetokenizer(tiny_tokenizer, tiny_tokenizer.encode("go"))
    assert stream(detok, ids) == ["", "", "", "\U0001f680"]


def test_flush_releases_an_unfinished_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ok \U0001f680", add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    assert "".join(stream(detok, ids[:-1])) == "ok "
    assert detok.flush() == REPLACEMENT_CHAR
    assert detok.text == "ok " + REPLACEMENT_CHAR


def test_special_tokens_are_skipped_and_prompt_never_emitted(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("hello there")
    ids = tiny_tokenizer.encode(" world", add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt)
    assert "".join(stream(detok, ids)) == " world"
    kept = IncrementalDetokenizer(tiny_tokenizer, prompt, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == " world</s>"


@pytest.mark.slow
def test_leading_space_kept_after_prompt(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    generated = tokenizer.encode(" Paris. Größe: 😀 日本", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = stream(detok, generated)
    assert "".join(deltas) == " Paris. Größe: 😀 日本"
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
