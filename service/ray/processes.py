"""The processes a local Ray cluster started for ``dynfuse serve --engine ray``, so that none outlives it.

Ray's processes (GCS, raylet, the agents, every worker and replica) are started by this process or by its
children, and some of them start their own; when a parent dies first, its children are handed to init and
leave this process's tree. Made a child subreaper (Linux's ``PR_SET_CHILD_SUBREAPER``), this process gets
them instead, so that at the end every process below it, however deep, can be found and stopped. Nothing here
imports Ray.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans of this process's descendants are handed to it rather than to init (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below ``pid`` (this process by default), read from /proc."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] == "Z":
            continue  # a zombie has already ended: nothing to stop
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(grace_s: float) -> list[int]:
    """SIGTERM every descendant, SIGKILL the ones still alive after ``grace_s``; reap what is ours to reap.
    Returns the pids that had to be killed."""
    pids = descendants()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap()
        if not descendants():
            return []
        time.sleep(0.05)
    killed = descendants()
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while descendants() and time.monotonic() < deadline:
        _reap()
        time.sleep(0.02)
    return killed


def _reap() -> None:
    """Collect the exit status of ended children (orphans handed to a subreaper are its children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
