"""Write-aside directories: build a result in a hidden sibling, rename it into place when complete.

Data sets, training runs and exported model versions all use this, so a failure never leaves a
half-written directory where a reader would take it for a finished one.
"""

from __future__ import annotations

import uuid
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """A new empty hidden directory beside ``target`` (created with its parents).

    Not ``tempfile.mkdtemp``: its 0700 mode survives the rename and would lock every other user out of
    the result (a container's non-root user reading a store built as root, say). This one gets the
    usual mode, under the umask.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging
