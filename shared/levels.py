"""Where an adapter lives: the residency levels every service names the same way.

``DEVICE``: on the accelerator, ready for the LoRA kernels; ``HOST``: in host memory, one
copy away; ``DISK``: only its files. A :class:`Level` is a ``str`` (a ``StrEnum``), so it
travels in msgpack and JSON as its value and compares equal to the plain string.
"""

from __future__ import annotations

from enum import StrEnum


class Level(StrEnum):
    """A residency level, fastest first."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


LEVELS = tuple(level.value for level in Level)
