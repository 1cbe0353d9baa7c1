"""Children that die with their parent: Linux ``prctl(PR_SET_PDEATHSIG)`` as a ``preexec_fn``."""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the kernel send ``sig`` to the child when its parent dies."""
    return functools.partial(_set_parent_death_signal, sig)
