"""The name a base model is served under (the OpenAI ``model`` field and WorkerState.model).

The gateway and the workers must agree on it: requests are routed to workers whose state
names the same base model.
"""

from __future__ import annotations

import os
from pathlib import Path


def served_model_name(model_dir: str | Path, override: str = "") -> str:
    """``override`` when set, else the model directory's base name."""
    if override:
        return override
    name = Path(os.path.abspath(Path(model_dir).expanduser())).name  # symlinks keep their own name
    if not name:
        raise ValueError(f"cannot derive a model name from {model_dir!r}; set one explicitly")
    return name
