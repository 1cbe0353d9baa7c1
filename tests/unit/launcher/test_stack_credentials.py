"""The NATS credentials and the admin key `caraserve up` gives its services (no processes started)."""

from __future__ import annotations

import stat

from launcher.local_stack import ADMIN_TENANT, LocalStack, StackConfig
from launcher.stack_credentials import StackCredentials
from shared.nats_auth import read_credentials
from shared.nats_server import NatsServer


def stack_for(tmp_path, monkeypatch, api_keys: str = "", **config) -> LocalStack:
    monkeypatch.delenv("CARASERVE_API_KEYS", raising=False)
    monkeypatch.delenv("CARASERVE_TENANT_ADAPTERS", raising=False)
    if api_keys:
        monkeypatch.setenv("CARASERVE_API_KEYS", api_keys)
    stack = LocalStack(StackConfig(http_port=0, nats_port=0, run_dir=str(tmp_path / "run"), **config))
    stack.nats = NatsServer()  # never started: only its (empty) url is read
    stack.creds = StackCredentials.generate(stack.run_dir / "nats", stack.config.schedulers, stack.config.workers)
    stack.creds.add_clients(stack.config.nats_client_creds)
    return stack


def test_each_service_gets_its_own_private_credentials(tmp_path, monkeypatch):
    stack = stack_for(tmp_path, monkeypatch, workers=2, schedulers=2)
    envs = [stack._gateway_env(), stack._scheduler_env(0), stack._scheduler_env(1), stack._worker_env(0),
            stack._worker_env(1)]
    files = [env["CARASERVE_NATS_CREDS"] for env in envs]
    creds = [read_credentials(path) for path in files]
    assert len({c.user for c in creds}) == len({c.password for c in creds}) == len({c.inbox_prefix for c in creds}) == 5
    assert creds[3].inbox_prefix == "_INBOX.worker.worker-0" and creds[0].inbox_prefix == "_INBOX.gw.gateway"
    assert {user.credentials.user for user in stack.creds.users} >= {c.user for c in creds}
    for path in files:
        assert stat.S_IMODE((tmp_path / "run" / "nats" / path.rsplit("/", 1)[1]).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "run" / "nats").stat().st_mode) == 0o700


def test_client_credentials_are_written_where_asked(tmp_path, monkeypatch):
    stack = stack_for(tmp_path, monkeypatch, nats_client_creds=(str(tmp_path / "a.json"), str(tmp_path / "b.json")))
    a, b = read_credentials(tmp_path / "a.json"), read_credentials(tmp_path / "b.json")
    assert a.inbox_prefix == "_INBOX.client.0" and b.inbox_prefix == "_INBOX.client.1" and a.password != b.password
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600
    assert {a.user, b.user} <= {user.credentials.user for user in stack.creds.users}


def test_with_api_keys_the_launcher_gets_its_own_admin_key(tmp_path, monkeypatch):
    stack = stack_for(tmp_path, monkeypatch, api_keys="k1:alice")
    env = stack._gateway_env()
    assert stack.admin_key and env["CARASERVE_API_KEYS"] == f"k1:alice,{stack.admin_key}:{ADMIN_TENANT}"
    assert env["CARASERVE_TENANT_ADAPTERS"] == f"{ADMIN_TENANT}:*"


def test_open_mode_stays_open(tmp_path, monkeypatch):
    stack = stack_for(tmp_path, monkeypatch)
    assert not stack._gateway_env().get("CARASERVE_API_KEYS") and stack.admin_key is None
