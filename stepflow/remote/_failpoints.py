"""Failpoints: named places where a crash test makes the process die, exactly there.

``STEPFLOW_FAILPOINTS=name[,name...]`` in a process's environment makes :func:`failpoint` kill
that process with SIGKILL when it passes the named place. The crash tests use them to prove
that a runner dying at any phase (building, pushing, job recorded, container created, job
finished but not collected) is resumed without losing or duplicating work. Nothing else sets
the variable; unset, a failpoint costs one set lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(filter(None, os.environ.get("STEPFLOW_FAILPOINTS", "").split(",")))


def failpoint(name: str) -> None:
    """Die here (SIGKILL, as ``kill -9`` would) when ``name`` is listed in ``$STEPFLOW_FAILPOINTS``."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
