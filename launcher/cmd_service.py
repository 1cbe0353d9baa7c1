"""``caraserve service NAME [--FLAG VALUE ...]``: run one service, configured from CARASERVE_* variables
(docker-compose) and, overriding them, from flags of its config dataclasses
(``caraserve service gpu_worker --cold-start cpu_assist``).

Each service class (see SERVICES) provides ``from_environ(environ)``, ``config_classes()``,
``async start(stack)`` and a ``healthy`` property. While it runs, a heartbeat file is
touched every few seconds as long as the service is healthy (connected to NATS);
``caraserve service NAME --check`` exits 0 when that file is fresh, which is what the
container healthchecks call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import time
from pathlib import Path
from typing import Any

from launcher.cli import CliError

SERVICES = {
    "gateway": "services.gateway.service:GatewayService",
    "scheduler": "services.scheduler.service:SchedulerService",
    "gpu_worker": "services.gpu_worker.service:GpuWorkerService",
    "cpu_prefill": "services.cpu_prefill.service:CpuPrefillService",
}
HEALTH_DIR_ENV = "CARASERVE_HEALTH_DIR"
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_MAX_AGE_S = 10.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("service", help="run one service (configured from CARASERVE_* variables)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SERVICES), help="the service to run")
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if the running service's heartbeat is fresh (container healthcheck)")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="flags of the service's config (e.g. --cold-start cpu_assist); they override "
                             "the CARASERVE_* variables")
    parser.set_defaults(func=run)


def flag_environ(name: str, config_classes: tuple[type, ...], options: list[str]) -> dict[str, str]:
    """The CARASERVE_* variables that ``options`` (flags of ``config_classes``) set; CliError on a bad flag."""
    from shared.config import add_arguments

    parser = argparse.ArgumentParser(prog=f"caraserve service {name}", conflict_handler="resolve",
                                     exit_on_error=False)
    for cls in config_classes:
        add_arguments(parser, cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only the flags actually given
    try:
        given = vars(parser.parse_args(options))
    except SystemExit as exc:
        if exc.code == 0:  # --help printed the service's flags
            raise
        raise CliError(f"caraserve service {name}: bad flags {' '.join(options)}") from None
    except argparse.ArgumentError as exc:
        raise CliError(f"caraserve service {name}: {exc}") from None
    return {f"CARASERVE_{key.upper()}": _env_value(value) for key, value in given.items()}


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def service_class(name: str) -> Any:
    """The class that implements service ``name``; CliError if it is not available."""
    module_name, _, class_name = SERVICES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CliError(f"the {name} service is not available in this build ({module_name} is missing)") from exc
        raise
    return getattr(module, class_name)


def heartbeat_path(name: str, environ: Any = os.environ) -> Path:
    return Path(environ.get(HEALTH_DIR_ENV) or "/tmp") / f"caraserve-{name}.health"


def check(name: str) -> int:
    path = heartbeat_path(name)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"{name}: no heartbeat at {path}")
        return 1
    if age > HEARTBEAT_MAX_AGE_S:
        print(f"{name}: heartbeat is {age:.0f}s old")
        return 1
    print(f"{name}: healthy")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.check or "--check" in args.options:  # the flags after NAME land in options
        return check(args.name)
    from shared.bus import run_service
    from shared.config import ConfigError

    cls = service_class(args.name)
    environ = {**os.environ, **flag_environ(args.name, cls.config_classes(), args.options)}
    try:
        service = cls.from_environ(environ)
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    path = heartbeat_path(args.name)

    async def start(stack: contextlib.AsyncExitStack) -> None:
        await service.start(stack)
        task = asyncio.get_running_loop().create_task(_heartbeat(service, path))
        stack.push_async_callback(_stop_heartbeat, task, path)

    try:
        run_service(start)
    except (ConnectionError, ConfigError) as exc:  # NATS unreachable past the connect deadline; a refused setting
        raise CliError(str(exc)) from exc
    return 0


async def _heartbeat(service: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        if service.healthy:
            path.touch()
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


async def _stop_heartbeat(task: asyncio.Task, path: Path) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    path.unlink(missing_ok=True)
