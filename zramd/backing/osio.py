"""The operating-system calls of a backing store: open with a lock, size, give space back.

Theory of operation
-------------------
**Owns** the few calls the standard library does not wrap: ``fallocate(PUNCH_HOLE |
KEEP_SIZE)`` through ctypes (``os.posix_fallocate`` has no mode), the block device ioctls
``BLKGETSIZE64`` and ``BLKDISCARD``, and the exclusive open. Knows nothing of the format.

**Exclusive use**: a file is opened with a non-blocking ``flock(LOCK_EX)`` (another export or
another daemon holding it gets :class:`BusyError`); a block device also with ``O_EXCL``, which
the kernel refuses while the device is mounted or claimed by another ``O_EXCL`` opener.

**Giving space back** is best effort: a filesystem without hole punching (EOPNOTSUPP) or a
device without discard keeps the bytes; the caller overwrites them later anyway, so
:func:`release` returns False then instead of raising, and the store counts it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: _IO(0x12, 119) and _IOR(0x12, 114, size_t)
BLKDISCARD = 0x1277
BLKGETSIZE64 = 0x80081272
_RANGE = struct.Struct("=QQ")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

#: errnos that mean "this file or device cannot give space back", not a failure
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS}


class BusyError(OSError):
    """Another opener (export, daemon) holds the file or device."""


def open_exclusive(path: str, *, create: bool) -> tuple[int, bool]:
    """Open ``path`` read-write and lock it for this process: (fd, is a block device).
    ``create`` creates a missing regular file (mode 0600). Raises OSError (BusyError when held,
    IsADirectoryError/ValueError for something neither a file nor a block device)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ValueError(f"{path}: neither a regular file nor a block device")
    is_blk = st is not None and stat.S_ISBLK(st.st_mode)
    flags = os.O_RDWR | os.O_CLOEXEC
    if is_blk:
        flags |= os.O_EXCL
    elif create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise BusyError(e.errno, f"{path}: in use (mounted or opened by another)") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BusyError(errno.EBUSY, f"{path}: in use by another export or process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, is_blk


def device_size(fd: int) -> int:
    """Size in bytes of the block device open on ``fd``."""
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf)
    return int(struct.unpack("=Q", buf)[0])


def release(fd: int, offset: int, length: int, *, block_device: bool) -> bool:
    """Give ``[offset, offset + length)`` back: punch a hole in a file (its size unchanged) or
    discard on a block device. False when the file system or device cannot; raises OSError for
    a real failure (EIO)."""
    if length <= 0:
        return True
    if block_device:
        try:
            fcntl.ioctl(fd, BLKDISCARD, _RANGE.pack(offset, length))
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return False
            raise
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def allocated_bytes(fd: int) -> int:
    """Bytes the file system holds for the file on ``fd`` (``st_blocks``; 0 for a device)."""
    st = os.fstat(fd)
    return 0 if stat.S_ISBLK(st.st_mode) else st.st_blocks * 512
