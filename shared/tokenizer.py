"""Tokenizer helpers: loading, chat templating and incremental (streaming) detokenization.

:class:`IncrementalDetokenizer` turns generated token ids into text deltas as they arrive. A
byte-level BPE token may carry only part of a multi-byte UTF-8 character; decoding it alone gives
U+FFFD. The detokenizer keeps a short window of ids, decodes it, and holds back any text that ends
in U+FFFD until a later token completes the character (or :meth:`IncrementalDetokenizer.flush`
is called at the end of the stream). Decoding a few tokens of context before the new ones keeps
word-boundary spacing right for tokenizers that strip a leading space from the first token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError

if TYPE_CHECKING:  # transformers (and torch behind it) is imported when a tokenizer is loaded, not before
    from transformers import PreTrainedTokenizerFast

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or used as asked."""


class ChatTemplateError(TokenizerError):
    """Chat messages cannot be rendered (no template, malformed messages, template error)."""


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer of a local model directory (``tokenizer.json``; never the network)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path} has no tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TokenizerError(f"{path} did not give a fast tokenizer (got {type(tokenizer).__name__})")
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerFast, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``, as ``tokenizer.encode`` gives them, straight from the Rust backend.

    The backend applies the same normalizer, pre-tokenizer, model and post-processor (BOS/EOS)
    as transformers' wrapper, without its per-call Python overhead (about half the time of a
    short prompt), which sits on the gateway's path to the first token. ``encode_batch`` (of
    one text) rather than ``encode``: it releases the GIL while it works, so a long prompt
    tokenized on a worker thread does not stall the event loop (``encode`` holds it throughout).
    """
    return tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def apply_chat_template(tokenizer: PreTrainedTokenizerFast,
                        messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Render ``messages`` ([{role, content}, ...]) with the tokenizer's chat template.

    The prompt ends with the assistant turn opener. Returns token ids; special tokens come only
    from the template itself (no extra BOS is added).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model's tokenizer has no chat template; send a plain prompt")
    _check_messages(messages)
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    return encode_prompt(tokenizer, text, add_special_tokens=False)


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}] must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ChatTemplateError(f"messages[{index}].{key} must be a string")


class IncrementalDetokenizer:
    """Streams the text of generated tokens, one delta per :meth:`step`.

    ``prompt_ids`` only provide context (their text is never emitted). ``text`` is everything
    emitted so far; the engine matches stop strings against it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - CONTEXT_TOKENS, 0)
        self.text = ""

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text ("" while a character is partial)."""
        self._ids.extend(int(t) for t in new_token_ids)
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(full_text[len(prefix_text):])

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character becomes U+FFFD)."""
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text):
            return ""
        return self._emit(full_text[len(prefix_text):])

    def _decode_window(self) -> tuple[str, str]:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        return prefix, full

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special,
                                      clean_up_tokenization_spaces=False)

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
