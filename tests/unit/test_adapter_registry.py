"""The adapter registry: records from metadata, path confinement, the resolver, conflicts, unload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared.adapter_registry import (AdapterConflictError, AdapterNotFoundError, AdapterPathError, AdapterRegistry,
                                     RegistryError)
from shared.llama_shape import LlamaShape
from shared.peft_adapter import AdapterError, load_adapter


@pytest.fixture
def root(tmp_path, tiny_adapters) -> Path:
    """An adapter root holding copies of two tiny adapters, plus a directory outside it."""
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ("qv_r8", "regex_r64"):
        shutil.copytree(tiny_adapters[name], root / name)
    shutil.copytree(tiny_adapters["all7_r16"], tmp_path / "outside")
    return root


def test_record_from_metadata_matches_loaded_weights(root, tiny_model_dir):
    registry = AdapterRegistry(root, max_rank=64, dtype_bytes=4)
    record = registry.register("qv", "qv_r8", owner="tenant-a")
    loaded = load_adapter("qv", root / "qv_r8", LlamaShape.from_model_dir(tiny_model_dir))
    assert (record.rank, record.target_modules, record.owner) == (8, ("q_proj", "v_proj"), "tenant-a")
    assert record.nbytes == loaded.nbytes  # fp32 weights, exact rank
    big = registry.register("r64", root / "regex_r64")
    assert big.rank == 64 and big.target_modules == ("o_proj", "q_proj")


def test_bytes_follow_dtype(root):
    bf16 = AdapterRegistry(root, dtype_bytes=2).register("a", "qv_r8")
    fp32 = AdapterRegistry(root, dtype_bytes=4).register("a", "qv_r8")
    assert fp32.nbytes == 2 * bf16.nbytes


@pytest.mark.parametrize("path", ["../outside", "qv_r8/../../outside", "/etc", "."])
def test_paths_outside_the_root_are_rejected(root, path):
    registry = AdapterRegistry(root)
    with pytest.raises(AdapterPathError) as err:
        registry.register("x", path)
    assert err.value.http_status == 400
    assert registry.names() == []


def test_absolute_path_outside_root_rejected(root):
    with pytest.raises(AdapterPathError):
        AdapterRegistry(root).register("x", root.parent / "outside")


def test_absolute_path_inside_root_accepted(root):
    assert AdapterRegistry(root).register("x", root / "qv_r8").rank == 8


def test_symlink_escape_rejected(root):
    os.symlink(root.parent / "outside", root / "sneaky")
    registry = AdapterRegistry(root)
    with pytest.raises(AdapterPathError):
        registry.register("sneaky", "sneaky")
    with pytest.raises(AdapterPathError):
        registry.resolve("sneaky")  # the resolver applies the same check


def test_symlinked_file_escape_rejected(root):
    target = root / "qv_r8" / "adapter_model.safetensors"
    target.unlink()
    os.symlink(root.parent / "outside" / "adapter_model.safetensors", target)
    with pytest.raises(AdapterPathError):
        AdapterRegistry(root).register("qv", "qv_r8")


def test_symlink_inside_root_is_fine(root):
    os.symlink(root / "qv_r8", root / "alias")
    assert AdapterRegistry(root).register("alias", "alias").path == str(root / "qv_r8")


def test_no_root_refuses_paths_but_trusts_configured_adapters(root):
    registry = AdapterRegistry(None)
    with pytest.raises(AdapterPathError):
        registry.register("qv", root / "qv_r8")
    assert registry.add_trusted("qv", root / "qv_r8").rank == 8
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("regex_r64")


def test_duplicate_name_different_path_is_an_error(root):
    registry = AdapterRegistry(root)
    first = registry.register("a", "qv_r8")
    assert registry.register("a", root / "qv_r8") == first  # same path: idempotent
    with pytest.raises(AdapterConflictError, match="already registered"):
        registry.register("a", "regex_r64")
    assert registry.lookup("a") == first


def test_reregister_pinned_raises_the_flag(root):
    registry = AdapterRegistry(root)
    registry.register("a", "qv_r8")
    assert registry.register("a", "qv_r8", pinned=True).pinned
    assert registry.lookup("a").pinned


def test_resolver_registers_on_first_use(root):
    registry = AdapterRegistry(root)
    assert registry.lookup("qv_r8") is None
    assert registry.resolve("qv_r8").rank == 8
    assert registry.names() == ["qv_r8"]
    with pytest.raises(AdapterNotFoundError) as err:
        registry.resolve("nope")
    assert err.value.http_status == 404
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("qv_r8/../regex_r64")


def test_unregister_blocks_the_resolver_until_registered_again(root):
    registry = AdapterRegistry(root)
    registry.resolve("qv_r8")
    registry.unregister("qv_r8")
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("qv_r8")
    with pytest.raises(AdapterNotFoundError):
        registry.unregister("qv_r8")
    registry.register("qv_r8", "qv_r8")
    assert registry.resolve("qv_r8").rank == 8


def test_invalid_name(root):
    with pytest.raises(RegistryError, match="invalid adapter name"):
        AdapterRegistry(root).register("../x", "qv_r8")


@pytest.mark.parametrize("kind", ["corrupt_weights", "invalid_config", "missing_config", "rank_too_high", "dora"])
def test_bad_adapters_raise_adapter_error(tmp_path, bad_adapters, kind):
    shutil.copytree(bad_adapters[kind], tmp_path / kind)
    registry = AdapterRegistry(tmp_path, max_rank=64)
    with pytest.raises(AdapterError):
        registry.register(kind, kind)
    assert registry.names() == []


def test_discover_registers_every_good_subdirectory(root, bad_adapters):
    shutil.copytree(bad_adapters["invalid_config"], root / "broken")
    registry = AdapterRegistry(root)
    assert [r.name for r in registry.discover()] == ["qv_r8", "regex_r64"]
