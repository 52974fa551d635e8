"""File locks of a checkpoint directory: one per shard, one for the manifest, one for merges.

Takes paths; knows nothing of parts, manifests or jobs. A shard's lock file
(``shard-00000-of-00003.lock``) is held with an exclusive, non-blocking ``flock`` by the run of
that shard for the whole run and holds its pid/host/start (for status, informational only);
``manifest.lock`` is held, blocking, for the milliseconds it takes to read, create or wipe the
manifest; ``merge.lock`` for a merge, or while a retry changes a shard's parts (on a checkpoint
that cannot be written and has no ``merge.lock``, a merge goes on without it).

Contract: a lock is held by a live process or by none: the kernel drops a ``flock`` when its
holder dies, so a killed run never blocks the next one, and `is_locked` never counts a killed
holder. Lock files are never deleted: deleting a flock'd file lets a second process lock a fresh
inode of the same name. ``flock`` works over NFSv4 and Lustre; on old NFS mounts use one machine
per shard directory.

`CheckpointError` lives here because `LockHeld` is one; `jobrunner.checkpoint` re-exports both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class CheckpointError(Exception):
    """The checkpoint directory cannot be used as asked; the message says what to do."""


class LockHeld(CheckpointError):
    """Another live process holds the lock."""

    def __init__(self, path: Path, info: dict[str, Any] | None):
        self.path, self.info = Path(path), info or {}
        shown = {k: v for k, v in self.info.items() if k in ("pid", "host", "started")}
        if isinstance(shown.get("started"), int | float):
            shown["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(shown["started"]))
        who = ", ".join(f"{k} {v}" for k, v in shown.items())
        super().__init__(f"another run holds the lock {self.path}" + (f" ({who})" if who else ""))


def read_lock_info(path: Path) -> dict[str, Any] | None:
    """The pid/host/start written by the lock's last holder (informational only)."""
    try:
        return json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None


def is_locked(path: Path) -> bool:
    """Whether a live process holds the flock on ``path`` (a killed holder never counts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the shared lock if we got it
    return False


class JobLock:
    """Exclusive, non-blocking ``flock`` on a file; raises `LockHeld` if another holder is alive.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> JobLock:
        """Take the lock.

        Raises:
            LockHeld: another live process holds it.
            CheckpointError: the lock file cannot be created (read-only or missing folder).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(
                f"cannot create the lock file {self.path}: {err.strerror or err}; choose a "
                "writable place for the output and checkpoint folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, read_lock_info(self.path)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def _manifest_lock(
    directory: Path, name: str = "manifest.lock", waiting: Callable[[], None] | None = None
) -> Iterator[None]:
    """Serialise manifest reads/writes/wipes between shards (held for milliseconds); with
    ``name`` ``merge.lock``, merges with each other and with ``drop_errors`` (held for a merge).

    ``waiting``: called every 0.2 s while another process holds the lock (it may raise, to
    give up); without it, the wait blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if name == "manifest.lock":
            raise
        try:  # a read-only checkpoint: flock works on a read-only descriptor
            fd = os.open(directory / name, os.O_RDONLY)
        except OSError:  # no lock file and none can be made: nothing can change the parts
            yield
            return
    try:
        if waiting is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waiting()
                    time.sleep(0.2)
        yield
    finally:
        os.close(fd)
