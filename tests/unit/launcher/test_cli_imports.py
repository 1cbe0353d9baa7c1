"""Every `caraserve` command builds the whole parser first; that must stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_building_the_cli_parser_imports_neither_torch_nor_transformers():
    code = ("import sys; from launcher.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
