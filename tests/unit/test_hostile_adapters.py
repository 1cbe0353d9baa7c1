"""Hostile adapter folders (issue 13): refused with one-line AdapterErrors, quickly, and skipped
with one log line at start-up (worker registry discovery; the gateway reads no adapter folder,
it learns adapters from the workers' states)."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import pytest

from shared.adapter_registry import AdapterPathError, AdapterRegistry
from shared.llama_shape import LlamaShape
from shared.peft_adapter import AdapterError, load_adapter, read_adapter_config, validate_adapter
from tests.tiny_adapters import build_hostile_adapters, edit_adapter_config

# kind -> what the one-line error says
REFUSED = {
    "rank_bool": "r must be an integer, got True",
    "huge_int": "number literal longer",
    "deep_config": "nested deeper",
    "nan_weights": "NaN or Inf",
    "sparse_claim": "do not match the base model",
    "backref_targets": "not supported (linear-time RE2 syntax only)",
    "long_pattern": "pattern longer than 1024",
}
REFUSED_BY_METADATA = sorted(set(REFUSED) - {"nan_weights"})  # what the registry sees without reading weights


@pytest.fixture(scope="module")
def hostile(tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    return build_hostile_adapters(tiny_adapters["qv_r8"], tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def shape(tiny_model_dir) -> LlamaShape:
    return LlamaShape.from_model_dir(tiny_model_dir)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_validate_refuses_each_hostile_adapter_fast(hostile, shape, kind):
    start = time.monotonic()
    with pytest.raises(AdapterError) as err:
        validate_adapter("bad", hostile[kind], shape, max_rank=64)
    assert time.monotonic() - start < 2.0
    message = str(err.value)
    assert message.startswith("adapter 'bad': ") and "\n" not in message and len(message) < 400
    assert REFUSED[kind] in message, message


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_load_refuses_each_hostile_adapter(hostile, shape, kind):
    with pytest.raises(AdapterError, match=re.escape(REFUSED[kind])):
        load_adapter("bad", hostile[kind], shape, max_rank=64)


@pytest.mark.timeout(20)
def test_redos_target_pattern_is_matched_in_linear_time(hostile, shape):
    start = time.monotonic()
    validate_adapter("evil", hostile["redos_targets"], shape, max_rank=64)  # RE2: matches nothing, at once
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("kind", REFUSED_BY_METADATA)
def test_registry_with_the_base_shape_refuses_on_metadata(hostile, shape, kind):
    registry = AdapterRegistry(hostile[kind].parent, max_rank=64, dtype_bytes=4, shape=shape)
    with pytest.raises(AdapterError, match=re.escape(REFUSED[kind])):
        registry.register(kind, kind)
    assert registry.names() == []


def test_bool_and_other_wrong_types_are_refused(tiny_adapters, tmp_path):
    for field, value, what in [("r", 8.0, "integer"), ("lora_alpha", False, "number"),
                               ("target_modules", [1], "list of strings"), ("rank_pattern", {"q": True}, "integers"),
                               ("use_rslora", "yes", "true or false"), ("layers_to_transform", "0", "integer")]:
        folder = tmp_path / field
        shutil.copytree(tiny_adapters["qv_r8"], folder)
        edit_adapter_config(folder, **{field: value})
        with pytest.raises(AdapterError, match=f"{field} must be .*{what}"):
            read_adapter_config(field, folder)


@pytest.mark.parametrize("path", ["qv\x00_r8", "a" * 5000, "qv_r8/" + "b" * 300])
def test_registry_refuses_unusable_paths(tmp_path, tiny_adapters, path):
    shutil.copytree(tiny_adapters["qv_r8"], tmp_path / "qv_r8")
    with pytest.raises(AdapterPathError):
        AdapterRegistry(tmp_path).register("x", path)


def test_worker_discovery_skips_each_bad_folder_with_one_line(hostile, tiny_adapters, shape, tmp_path, caplog):
    root = Path(shutil.copytree(hostile["rank_bool"].parent, tmp_path / "root"))
    shutil.copytree(tiny_adapters["qv_r8"], root / "good")
    registry = AdapterRegistry(root, max_rank=64, dtype_bytes=4, shape=shape)
    with caplog.at_level(logging.WARNING, logger="shared.adapter_registry"):
        names = [r.name for r in registry.discover()]
    # NaN weights are found when the weights are read (registration, first load), not by discovery.
    assert names == ["good", "nan_weights", "redos_targets"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(REFUSED_BY_METADATA)
    for kind in REFUSED_BY_METADATA:
        assert sum(f"{root / kind} skipped" in line for line in lines) == 1, lines
    assert all("\n" not in line and len(line) < 600 for line in lines)
