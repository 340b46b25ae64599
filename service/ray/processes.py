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


def stop_descendants(grace_s: float, settle_s: float = 0.0) -> list[int]:
    """SIGTERM every descendant (and any started meanwhile); after ``grace_s``, SIGKILL whatever is still alive,
    again and again; done once none has been alive for ``settle_s`` (a start still under way may spawn one more),
    or 2 s after the grace. Reaps what is ours to reap. Returns the pids that had to be killed."""
    began = time.monotonic()
    termed: set[int] = set()
    killed: list[int] = []
    quiet_since: float | None = None
    while True:
        _reap()
        alive = descendants()
        now = time.monotonic()
        if not alive:
            quiet_since = quiet_since or now
            if now - quiet_since >= settle_s:
                return killed
        else:
            quiet_since = None
        for pid in alive:
            if now - began < grace_s:
                if pid not in termed:
                    termed.add(pid)
                    _send(pid, signal.SIGTERM)
            else:
                if pid not in killed:
                    killed.append(pid)
                _send(pid, signal.SIGKILL)
        if now - began >= grace_s + 2.0 + settle_s:
            return killed
        time.sleep(0.02 if killed else 0.05)


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _reap() -> None:
    """Collect the exit status of ended children (orphans handed to a subreaper are its children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
