"""The worker refuses hostile adapters when they are registered (adapters.load), as typed
invalid_request errors, and keeps serving the rest (issue 13)."""

from __future__ import annotations

import shutil

import pytest

from services.gpu_worker.adapter_admin import AdapterAdmin
from shared.schemas import AdapterLoad, ServiceError
from tests.tiny_adapters import build_hostile_adapters
from tests.unit.gpu_worker.residency_fixtures import make_manager, residency_root, tiny_shape  # noqa: F401

REFUSED = {"rank_bool": "r must be an integer", "huge_int": "number literal", "deep_config": "nested deeper",
           "nan_weights": "NaN or Inf", "sparse_claim": "do not match the base model",
           "backref_targets": "not supported", "long_pattern": "pattern longer"}


@pytest.fixture
def admin(make_manager, residency_root, tmp_path) -> AdapterAdmin:
    root = tmp_path / "root"
    shutil.copytree(residency_root, root)
    build_hostile_adapters(root / "a0", tmp_path / "hostile")
    shutil.copytree(tmp_path / "hostile", root / "uploads")
    return AdapterAdmin("w7", make_manager(root=root))


@pytest.mark.parametrize("kind", sorted(REFUSED))
async def test_hostile_adapter_is_an_invalid_request_at_registration(admin, kind):
    before = admin.residency.names()
    with pytest.raises(ServiceError) as err:
        await admin.on_load(AdapterLoad(name="x", path=f"uploads/{kind}"))
    assert err.value.info.code == "invalid_request" and REFUSED[kind] in err.value.info.message
    assert admin.residency.names() == before
    listing = await admin.on_load(AdapterLoad(name="fine", path="a1"))  # the worker goes on
    assert "fine" in {a.name for a in listing.adapters}


@pytest.mark.timeout(30)
async def test_redos_pattern_registers_quickly(admin):
    listing = await admin.on_load(AdapterLoad(name="evil", path="uploads/redos_targets"))
    assert "evil" in {a.name for a in listing.adapters}


@pytest.mark.parametrize("path", ["a0\x00", "a" * 4000, "a0/" + "b" * 300])
async def test_unusable_paths_are_invalid_requests(admin, path):
    with pytest.raises(ServiceError) as err:
        await admin.on_load(AdapterLoad(name="x", path=path))
    assert err.value.info.code == "invalid_request"
