"""Whether the engine benchmark's vLLM peer can run: its venv's Python exists and imports vllm.

vLLM's CPU backend lives in its own venv (``.venv-vllm``, created by ``make bench``, never by
``make test``) because it pins its own dependencies. When that venv is missing or vllm does not
import there, the benchmark skips configurations (f) and (g) with the reason this module gives.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

IMPORT_TIMEOUT_S = 120.0  # importing vllm takes a few seconds; far longer means something is wrong
INSTALL_HINT = "vLLM CPU backend not installed: run `make bench` (it creates .venv-vllm)"


def vllm_unavailable(python: Path) -> str | None:
    """None when ``python`` imports vllm, else one line saying why the vLLM configurations cannot run."""
    if not Path(python).is_file():
        return f"{INSTALL_HINT}; {python} is missing"
    try:
        proc = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True,
                              timeout=IMPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"vLLM CPU backend: `import vllm` under {python} took over {IMPORT_TIMEOUT_S:.0f} s"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"vLLM CPU backend does not import under {python}: {lines[-1] if lines else proc.returncode}"
    return None
