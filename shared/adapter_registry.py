"""The adapter registry: which adapter names exist, where they live, and what they cost.

Each :class:`AdapterRecord` maps a name to its PEFT directory, rank, target projections,
size in bytes at the serving dtype and owner tenant. Records are built from the
directory's ``adapter_config.json`` and the safetensors header alone, so registering is
cheap; both are read within bounds, and with the base model's shape (``shape=``) every
declared tensor is checked against it, so a header claiming a huge tensor is refused
here. Weights are read (and checked for NaN / Inf) by whoever registers at runtime
(``peft_adapter.validate_adapter``) and again when the adapter is first loaded.

Paths are confined to the adapter root (``--adapter-dir``): a path is resolved (``..``
and symlinks followed) and must land inside the root, and so must the adapter's two
files. Anything else raises :class:`AdapterPathError`, as does a path with control
characters (NUL) or longer than :data:`MAX_PATH_CHARS`. The **resolver**: the first use
of an unknown name registers the root's subdirectory of that name, unless the name was
explicitly unloaded since. Paths an operator configures (:meth:`AdapterRegistry.add_trusted`)
skip the root check. All methods are thread-safe.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from shared.llama_shape import LlamaShape
from shared.peft_adapter import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, check_supported, check_weight_shapes,
                                 read_adapter_config, read_weights_header)
from shared.schemas.names import NAME_PATTERN

log = logging.getLogger(__name__)

_NAME_RE = re.compile(NAME_PATTERN)
_LORA_KEY_RE = re.compile(r"\.(?P<proj>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux, and the AdapterLoad schema's bound


class RegistryError(ValueError):
    """A registry operation was refused; ``http_status`` is what the HTTP edge answers."""

    http_status = 400


class AdapterPathError(RegistryError):
    """The adapter path is outside the adapter root (traversal, absolute path, symlink escape)."""


class AdapterConflictError(RegistryError):
    """The name is already registered with a different path."""


class AdapterNotFoundError(RegistryError):
    """No adapter of that name is registered and the resolver found none."""

    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown adapter '{name}'")
        self.name = name


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter.

    ``nbytes`` is the size of its kernel-ready weights (A and B of every targeted module,
    at their exact rank) in the serving dtype: what it costs in host or device memory.
    """

    name: str
    path: str
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    owner: str | None = None
    pinned: bool = False


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise RegistryError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(f"invalid adapter name {name!r}: it must match {NAME_PATTERN}")
    return name


def describe_adapter(name: str, path: Path, max_rank: int, dtype_bytes: int, shape: LlamaShape | None = None
                     ) -> tuple[int, tuple[str, ...], int]:
    """(rank, target projections, bytes at ``dtype_bytes`` per element) read from metadata only.

    The config is parsed within bounds and type-checked, and the safetensors header is
    checked against the file's size; with the base model's ``shape``, every tensor's shape
    is checked against it too. No weight is read.
    """
    cfg = read_adapter_config(name, path)
    check_supported(name, cfg, max_rank)
    specs = read_weights_header(name, path)
    if shape is not None:
        check_weight_shapes(name, cfg, specs, shape)
    rank, projections, numel = 0, set(), 0
    for key, spec in specs.items():
        m = _LORA_KEY_RE.search(key)
        if m is None:
            continue
        if len(spec.shape) != 2 or 0 in spec.shape:
            raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: bad shape for {key[:200]}")
        if m["ab"] == "A":
            rank = max(rank, spec.shape[0])
        projections.add(m["proj"])
        numel += spec.numel
    if not numel:
        raise AdapterError(name, "no LoRA weights found")
    if rank > max_rank:
        raise AdapterError(name, f"rank {rank} exceeds --max-lora-rank {max_rank}")
    return rank, tuple(sorted(projections)), numel * dtype_bytes


def check_path_text(path: str | Path) -> None:
    """Refuse a path no adapter folder can have: empty, over MAX_PATH_CHARS, or with control characters."""
    text = str(path)
    if not text or len(text) > MAX_PATH_CHARS:
        raise AdapterPathError(f"adapter path must have 1 to {MAX_PATH_CHARS} characters, got {len(text)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise AdapterPathError("adapter path must not contain NUL or other control characters")


class AdapterRegistry:
    """Adapter names -> records, confined to one adapter root."""

    def __init__(self, root: str | Path | None, max_rank: int = 64, dtype_bytes: int = 2,
                 shape: LlamaShape | None = None) -> None:
        self.root = Path(root).resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise RegistryError(f"adapter root {root} is not a directory")
        self.max_rank, self.dtype_bytes, self.shape = max_rank, dtype_bytes, shape
        self._records: dict[str, AdapterRecord] = {}
        self._unloaded: set[str] = set()
        self._lock = threading.Lock()

    # ---- paths -------------------------------------------------------------------------
    def safe_path(self, path: str | Path) -> Path:
        """``path`` (absolute, or relative to the root) resolved; AdapterPathError unless inside the root."""
        if self.root is None:
            raise AdapterPathError("no adapter root is configured (--adapter-dir): adapters cannot be loaded by path")
        check_path_text(path)
        raw = Path(path)
        try:
            resolved = (raw if raw.is_absolute() else self.root / raw).resolve()
            self._check_inside(path, resolved)
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                if (resolved / file).exists():
                    self._check_inside(path, (resolved / file).resolve())
        except AdapterPathError:
            raise
        except (OSError, ValueError) as exc:  # e.g. a path component longer than NAME_MAX
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)  # strerror: without the long path
            raise AdapterPathError(f"adapter path {str(path)[:200]!r} cannot be resolved: {reason}") from None
        return resolved

    def _check_inside(self, given: str | Path, resolved: Path) -> None:
        assert self.root is not None
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise AdapterPathError(f"adapter path {str(given)[:200]!r} resolves outside the adapter root {self.root}")

    # ---- registration ------------------------------------------------------------------
    def register(self, name: str, path: str | Path, owner: str | None = None, pinned: bool = False) -> AdapterRecord:
        """Register ``name`` at ``path`` (which must lie inside the root).

        Registering a name again with the same path returns the existing record (with
        ``pinned`` raised if asked); with a different path raises AdapterConflictError.
        Raises AdapterPathError, AdapterError (unreadable or unsupported adapter) or RegistryError.
        """
        return self._add(check_name(name), self.safe_path(path), owner, pinned)

    def add_trusted(self, name: str, path: str | Path, owner: str | None = None, pinned: bool = False) -> AdapterRecord:
        """Register an adapter from the operator's own configuration (no root check)."""
        return self._add(check_name(name), Path(path).resolve(), owner, pinned)

    def _add(self, name: str, path: Path, owner: str | None, pinned: bool) -> AdapterRecord:
        with self._lock:
            existing = self._records.get(name)
        if existing is not None:
            return self._merge(existing, path, pinned)
        rank, targets, nbytes = describe_adapter(name, path, self.max_rank, self.dtype_bytes, self.shape)
        record = AdapterRecord(name, str(path), rank, targets, nbytes, owner, pinned)
        with self._lock:
            existing = self._records.setdefault(name, record)
            self._unloaded.discard(name)
        return record if existing is record else self._merge(existing, path, pinned)

    def _merge(self, existing: AdapterRecord, path: Path, pinned: bool) -> AdapterRecord:
        if existing.path != str(path):
            raise AdapterConflictError(f"adapter '{existing.name}' is already registered with path {existing.path}")
        if pinned and not existing.pinned:
            with self._lock:
                existing = self._records[existing.name] = replace(existing, pinned=True)
        return existing

    def unregister(self, name: str) -> AdapterRecord:
        """Remove ``name``; the resolver will not bring it back until it is registered again."""
        with self._lock:
            record = self._records.pop(name, None)
            if record is None:
                raise AdapterNotFoundError(name)
            self._unloaded.add(name)
        return record

    # ---- lookups -----------------------------------------------------------------------
    def lookup(self, name: str) -> AdapterRecord | None:
        """The record of a registered name, or None (never resolves)."""
        with self._lock:
            return self._records.get(name)

    def resolve(self, name: str) -> AdapterRecord:
        """The record of ``name``, registering ``<root>/<name>`` on first use.

        Raises AdapterNotFoundError, AdapterPathError (the name's directory escapes the
        root) or AdapterError (the directory is not a usable adapter).
        """
        record = self.lookup(name)
        if record is not None:
            return record
        with self._lock:
            blocked = name in self._unloaded
        if blocked or self.root is None or not self._resolvable(name):
            raise AdapterNotFoundError(name)
        return self.register(name, self.root / name)

    def _resolvable(self, name: str) -> bool:
        if not _NAME_RE.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
            return False
        assert self.root is not None
        return (self.root / name / CONFIG_FILE).exists()

    def discover(self) -> list[AdapterRecord]:
        """Register every direct subdirectory of the root that holds an adapter config.

        Subdirectories that are not usable adapters are skipped with one warning line each
        (start-up goes on); returns the records registered (or already present).
        """
        if self.root is None:
            return []
        records = []
        for sub in sorted(p for p in self.root.iterdir() if (p / CONFIG_FILE).exists()):
            try:
                records.append(self.resolve(sub.name))
            except (AdapterError, RegistryError, OSError) as exc:
                log.warning("adapter folder %s skipped: %s", sub, exc)
        return records

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._records[n] for n in sorted(self._records)]
