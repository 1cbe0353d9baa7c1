"""The `caraserve` command: one subcommand per module in launcher/.

Each subcommand module defines ``register(subparsers)`` (adds its parser and sets
``func``) and keeps its imports lazy, so `caraserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = (
    "launcher.cmd_batch",
    "launcher.cmd_up",
    "launcher.cmd_generate",
    "launcher.cmd_profile",
    "launcher.cmd_simulate",
    "launcher.cmd_service",
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """Bad flags give one error line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="caraserve", description="CPU-assisted, rank-aware LoRA serving")
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default: WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not built (yet) in this checkout
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"caraserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the package module so `CliError` is the class subcommands import.
    from launcher import cli

    sys.exit(cli.main())
