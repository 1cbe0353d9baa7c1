"""The worker's adapters.load / .unload / .list handlers (called directly, no NATS)."""

from __future__ import annotations

import shutil

import pytest

from services.gpu_worker.adapter_admin import AdapterAdmin
from shared.schemas import AdapterListRequest, AdapterLoad, AdapterUnload, ServiceError
from tests.unit.gpu_worker.residency_fixtures import make_manager, residency_root, tiny_shape  # noqa: F401


@pytest.fixture
def admin(make_manager) -> AdapterAdmin:
    return AdapterAdmin("w7", make_manager())


async def test_load_list_unload(admin):
    root_adapters = set(admin.residency.names())  # every adapter of the root is known from the start
    listing = await admin.on_load(AdapterLoad(name="x", path="a0", pinned=True, owner="tenant-a"))
    assert listing.worker_id == "w7"
    assert [(a.name, a.rank, a.pinned) for a in listing.adapters if a.name not in root_adapters] == [("x", 8, True)]
    assert admin.residency.registry.lookup("x").owner == "tenant-a"
    assert {a.name for a in (await admin.on_list(AdapterListRequest())).adapters} == root_adapters | {"x"}
    assert {a.name for a in (await admin.on_unload(AdapterUnload(name="x"))).adapters} == root_adapters


@pytest.mark.parametrize("path", ["../a0", "/etc", "a0/../../x"])
async def test_paths_outside_the_root_are_invalid_requests(admin, path):
    before = admin.residency.names()
    with pytest.raises(ServiceError) as err:
        await admin.on_load(AdapterLoad(name="x", path=path))
    assert err.value.info.code == "invalid_request" and "outside the adapter root" in err.value.info.message
    assert admin.residency.names() == before and "x" not in before


async def test_duplicate_name_with_another_path(admin):
    await admin.on_load(AdapterLoad(name="x", path="a0"))
    with pytest.raises(ServiceError, match="already registered"):
        await admin.on_load(AdapterLoad(name="x", path="a1"))


async def test_corrupt_adapter_is_an_invalid_request(tmp_path, make_manager, bad_adapters):
    shutil.copytree(bad_adapters["corrupt_weights"], tmp_path / "broken")
    admin = AdapterAdmin("w7", make_manager(root=tmp_path))
    with pytest.raises(ServiceError) as err:
        await admin.on_load(AdapterLoad(name="broken", path="broken"))
    assert err.value.info.code == "invalid_request" and "corrupt" in err.value.info.message


async def test_unknown_unload_is_not_found(admin):
    with pytest.raises(ServiceError) as err:
        await admin.on_unload(AdapterUnload(name="ghost"))
    assert err.value.info.code == "model_not_found"


async def test_a_worker_without_adapter_root_refuses_runtime_loads(tiny_model_dir, tiny_adapters, tiny_shape):
    import torch

    from services.gpu_worker.residency.config import ResidencyConfig
    from services.gpu_worker.residency.factory import Model, make_residency

    residency = make_residency(ResidencyConfig(cold_start="cached"), Model(tiny_shape, 64, torch.float32, "cpu", 256),
                               adapters={"qv": tiny_adapters["qv_r8"]}).residency
    try:
        admin = AdapterAdmin("w7", residency)
        with pytest.raises(ServiceError, match="no adapter root") as err:
            await admin.on_load(AdapterLoad(name="x", path="/tmp"))
        assert err.value.info.code == "invalid_request"
        assert [a.name for a in (await admin.on_list(AdapterListRequest())).adapters] == ["qv"]
    finally:
        residency.close()
