"""Adapter ownership on the gateway: only the owner tenant or an admin changes an adapter (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.gateway.adapter_owners import AdapterOwners
from services.gateway.fleet_view import FleetView
from services.gateway.tenancy import Tenancy
from shared.schemas import AdapterInfo, ServiceError

KEYS = ("ka:alice", "kb:bob", "kc:carol", "kroot:admin")


@pytest.fixture
def root(tmp_path) -> Path:
    for name in ("shared", "alice/sql", "bob/sql"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return tmp_path


def owners_for(root: Path | None, keys=KEYS) -> AdapterOwners:
    tenancy = Tenancy(keys, ("alice:shared", "carol:*"), ("admin",))
    fleet = FleetView("base", timeout_s=1.0)
    if root is not None:  # a worker serving the root lists its adapter folders
        fleet.observe_adapters("w0", [AdapterInfo(name="shared", rank=8, level="disk")])
    return AdapterOwners(tenancy, fleet, root)


def code(call) -> str | None:
    try:
        call()
    except ServiceError as exc:
        return exc.info.code
    return None


def test_new_names_belong_to_their_registrant(root):
    owners = owners_for(root)
    assert owners.claim("alice", "alice-sql", root / "alice/sql") is True
    assert owners.owner("alice-sql") == "alice"
    assert owners.claim("alice", "alice-sql", root / "alice/sql") is False  # her own: re-register is fine
    assert code(lambda: owners.claim("bob", "alice-sql", root / "alice/sql")) == "permission_denied"
    assert code(lambda: owners.claim("bob", "alice-sql", root / "bob/sql")) == "permission_denied"
    assert owners.claim("admin", "alice-sql", root / "alice/sql") is False
    assert owners.owner("alice-sql") == "alice"


def test_an_alias_cannot_open_another_tenants_folder(root):
    owners = owners_for(root)
    owners.claim("alice", "alice-sql", root / "alice/sql")
    assert code(lambda: owners.claim("bob", "bob-alias", root / "alice/sql")) == "permission_denied"
    assert owners.claim("carol", "carol-alias", root / "alice/sql")  # carol may use every adapter (*)
    assert owners.claim("admin", "admin-alias", root / "alice/sql")
    # the operator's folder "shared": alice may use it, bob may not
    assert owners.claim("alice", "alice-shared", root / "shared")
    assert code(lambda: owners.claim("bob", "bob-shared", root / "shared")) == "permission_denied"
    assert code(lambda: owners.claim("bob", "shared", root / "bob/sql")) == "permission_denied"  # operator's name


def test_unload_needs_the_owner_or_an_admin(root):
    owners = owners_for(root)
    owners.claim("alice", "alice-sql", root / "alice/sql")
    assert code(lambda: owners.check_unload("bob", "alice-sql")) == "model_not_found"  # he cannot even see it
    assert code(lambda: owners.check_unload("carol", "alice-sql")) == "permission_denied"  # sees it, not hers
    assert code(lambda: owners.check_unload("alice", "shared")) == "permission_denied"  # the operator's
    assert code(lambda: owners.check_unload("alice", "ghost")) == "model_not_found"
    assert code(lambda: owners.check_unload("alice", "alice-sql")) is None
    assert code(lambda: owners.check_unload("admin", "shared")) is None
    owners.release("alice-sql")
    assert owners.claim("bob", "alice-sql", root / "bob/sql")  # a freed name is free


def test_without_a_gateway_root_only_admins_register(root):
    owners = owners_for(None)
    assert code(lambda: owners.claim("alice", "x", None)) == "permission_denied"
    assert owners.claim("admin", "x", None)


def test_open_mode_everyone_is_admin(root):
    owners = owners_for(root, keys=())
    owners.claim("default", "a", root / "alice/sql")
    assert owners.claim("default", "b", root / "alice/sql")
    assert code(lambda: owners.check_unload("default", "shared")) is None
