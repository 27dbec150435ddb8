"""`--watch`: notice that the topology file changed, and say so once it has settled.

Polling, not inotify: a stat a second costs nothing, needs no dependency,
and sees the ways a file is replaced in practice: written in place, renamed
over (editors), or a Kubernetes ConfigMap volume's ``..data`` symlink swapped
to a new directory (``os.stat`` follows symlinks, so the device, inode, size
or mtime of what the path leads to changes).  A change is reported once the
file has looked the same on two polls in a row, so a file still being
written is not read half-way; a file that is missing (mid-swap) is waited
for, never reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("edge.watch")

WATCH_INTERVAL = 1.0        # seconds between two looks at the file

# (device, inode, size, mtime in ns) of the file a path leads to; None when there is none.
Signature = tuple[int, int, int, int] | None


def signature(path: Path) -> Signature:
    """Blocking (a stat): call it through ``asyncio.to_thread``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Settle:
    """Pure: from successive signatures, when to reload.

    Reload when the file differs from the one last reported (or the one at
    start) and two looks in a row agree on it.
    """

    def __init__(self, initial: Signature):
        self.reported = initial
        self.last = initial

    def observe(self, current: Signature) -> bool:
        due = current is not None and current == self.last and current != self.reported
        self.last = current
        if due:
            self.reported = current
        return due


async def watch(path: Path, on_change: Callable[[], None], interval: float = WATCH_INTERVAL) -> None:
    """Call `on_change()` after each settled change of `path`, until cancelled; stats run off the loop."""
    settle = Settle(await asyncio.to_thread(signature, path))
    while True:
        await asyncio.sleep(interval)
        if settle.observe(await asyncio.to_thread(signature, path)):
            log.info("%s changed: reloading", path)
            on_change()
