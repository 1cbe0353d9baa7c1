"""The models the gateway serves: the base model and the adapters it knows.

Adapters come from the configured adapter directory (each sub-directory holding an
``adapter_config.json`` is an adapter named after the directory) and from the workers'
``adapters.list`` answers. Each adapter's ``parent`` is the base model. A folder whose
config is unusable (too large, too deep, huge numbers, wrong types) is skipped with one
warning line; the gateway still starts.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared.peft_adapter import CONFIG_FILE, AdapterError, config_rank, read_adapter_config
from shared.schemas import AdapterList, ServiceError
from shared.schemas.names import NAME_PATTERN

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    """One servable adapter: its name, LoRA rank and when the gateway learned of it."""

    name: str
    rank: int
    created: int


class Catalog:
    """Base model plus adapters, looked up by the OpenAI ``model`` field."""

    def __init__(self, base_model: str) -> None:
        self.base_model = base_model
        self.created = int(time.time())
        self._adapters: dict[str, AdapterEntry] = {}

    def __len__(self) -> int:
        return len(self._adapters)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a known adapter."""
        return name in self._adapters

    def adapters(self) -> list[AdapterEntry]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def add(self, name: str, rank: int) -> None:
        if name == self.base_model:
            logger.warning("adapter %s shadows the base model's name; ignored", name)
            return
        if name not in self._adapters or self._adapters[name].rank != rank:
            self._adapters[name] = AdapterEntry(name, rank, int(time.time()))

    def load_dir(self, adapter_dir: str | Path) -> int:
        """Add every adapter directory under ``adapter_dir``; returns how many were added."""
        root = Path(adapter_dir).expanduser()
        if not root.is_dir():
            raise ValueError(f"adapter directory {root} does not exist")
        added = 0
        for path in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            rank = adapter_rank(path)
            if rank is None:
                continue
            self.add(path.name, rank)
            added += 1
        return added

    def remove(self, name: str) -> None:
        """Forget ``name`` (it was unloaded)."""
        self._adapters.pop(name, None)

    def merge(self, listing: AdapterList) -> None:
        """Add the adapters a worker reports."""
        for info in listing.adapters:
            self.add(info.name, info.rank)

    def resolve(self, model: str) -> str | None:
        """The adapter a ``model`` field names (None for the base model); ServiceError if unknown."""
        if model == self.base_model:
            return None
        if model in self._adapters:
            return model
        raise ServiceError("model_not_found", f"the model {model!r} does not exist")

    def rank_of(self, adapter: str | None) -> int:
        entry = self._adapters.get(adapter) if adapter else None
        return entry.rank if entry else 0


def adapter_rank(path: Path) -> int | None:
    """The largest LoRA rank in ``path``'s adapter_config.json (None, with one warning line, if unusable)."""
    if not re.fullmatch(NAME_PATTERN, path.name):
        logger.warning("adapter folder %r skipped: its name is not a valid model name", str(path))
        return None
    try:
        rank = config_rank(read_adapter_config(path.name, path))
    except (AdapterError, OSError) as exc:
        logger.warning("adapter folder %s skipped: %s", path, exc)
        return None
    if rank < 1:
        logger.warning("adapter folder %s skipped: invalid rank %d", path, rank)
        return None
    return rank
