"""The lock of a snapshot file: one export of one daemon uses a snapshot file at a time.

Theory of operation
-------------------
The snapshot itself cannot carry the lock: every save replaces it by a new file (written beside,
renamed over it), so a lock on the old inode would lock nothing. The lock is a file beside it,
``PATH.lock``, locked with a non-blocking ``flock(LOCK_EX)`` for as long as the export exists
(taken before its restore, released after its last save). Another export or another daemon that
names the same file fails to take it and gets :class:`SnapshotBusy`, whose message names the
file and the process id the holder wrote into the lock file. The kernel drops a flock when its
holder dies (``kill -9`` included), so a lock is never stale; the lock file stays (removing it
would let two openers lock two different inodes).
"""

from __future__ import annotations

import errno
import fcntl
import os

#: what the lock file's name adds to the snapshot's
LOCK_SUFFIX = ".lock"


class SnapshotBusy(Exception):
    """Another export or process holds the snapshot file's lock."""


class SnapshotLock:
    """The lock of the snapshot ``path`` (see the module doc), taken at construction. Raises
    SnapshotBusy when held elsewhere, OSError when the lock file cannot be opened."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + LOCK_SUFFIX
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise SnapshotBusy(
                f"snapshot {path} is in use by another export or daemon ({who} holds "
                f"{self.lock_path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
