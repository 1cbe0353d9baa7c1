"""Where a worker's profiles live: one file per (model digest, device name, dtype, backend).

Profiles are cached under ``<cache root>/profiles/`` (``~/.cache/caraserve/profiles/``, or
``$CARASERVE_CACHE_DIR/profiles/``), named ``<model digest>-<device>-<dtype>-<backend>.json``.
A worker looks there at start; ``caraserve profile`` without ``--out`` writes there, so a
full profile replaces the quick one a worker made. Making one takes an exclusive lock on
the key (``lock``), so workers sharing a host make it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.model_store import cache_root
from shared.perf_model import PerfModel, ProfileError

logger = logging.getLogger(__name__)


def model_digest(model_dir: Path) -> str:
    """Identity of a model's weights: its config and the names and sizes of its weight files."""
    h = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def profile_digest(text: str) -> str:
    """The digest a worker publishes for a profile: of its JSON text (16 hex digits)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profiles_dir() -> Path:
    return cache_root() / "profiles"


@dataclass(frozen=True)
class ProfileKey:
    """What a profile is valid for."""

    model_digest: str
    device_name: str
    dtype: str
    backend: str

    @property
    def path(self) -> Path:
        device = re.sub(r"[^A-Za-z0-9]+", "_", self.device_name).strip("_")[:48] or "device"
        return profiles_dir() / f"{self.model_digest}-{device}-{self.dtype}-{self.backend}.json"

    def load(self) -> tuple[PerfModel, str] | None:
        """(the cached profile, its JSON text), or None when there is none or it is not for this key
        (one log line says why; the caller makes a new one)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read profile %s (%s); making a new one", self.path, exc.strerror or exc)
            return None
        try:
            model = PerfModel.from_text(text, str(self.path))
            model.check(expect_device=self.device_name, expect_model_digest=self.model_digest,
                        expect_backend=self.backend, where=str(self.path), expect_dtype=self.dtype)
        except ProfileError as exc:
            logger.warning("%s; making a new one", exc)
            return None
        return model, text

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the key's lock file (blocking) while a profile for it is made."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
