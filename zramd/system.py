"""OS integration: sd_notify, swap safety (mlockall, PR_SET_IO_FLUSHER, oom_score_adj), RAM size.

Theory of operation
-------------------
This module owns every direct call into the kernel that is not I/O: the systemd
notification datagram, locking the address space, marking the process as an I/O
flusher, protecting it from the OOM killer, and reading the machine's RAM size.

Invariants:
- Nothing here raises on a missing privilege except ``apply_swap_safety("require")``;
  every other call reports failure by its return value so the daemon can go on.
- No dependency beyond the standard library (``ctypes`` for libc).
- It knows nothing of NBD, exports or the event loop.

Why malloc is tuned (:func:`tune_malloc`, at ``serve`` start): glibc serves an allocation of
at least its *mmap threshold* with a mapping of its own, unmapped again at ``free``, and gives
the free top of the heap back once it passes the *trim threshold*. Both start at 128 KiB and
move with the process's history (a freed mapping raises the mmap threshold to its size, and the
trim threshold to twice that). A 1 MiB WRITE payload or READ reply thus lands either in fresh
pages (256 page faults each, every request) or in heap memory used a moment before, depending
on what the process happened to free earlier: fio's 1 MiB sequential writes ran at 300-360 MB/s
on some server instances and 450-540 MB/s on others of the same build. Fixed thresholds make it
the fast case every time: buffers up to ``MALLOC_MMAP_THRESHOLD`` come from the heap, and up to
``MALLOC_TRIM_THRESHOLD`` of free heap top is kept for the next request (the same speed as 16
MiB kept, measured; what is kept costs RSS: about 0.3-1.5% of the density benchmark's memory
per byte with 16 MiB before the trim at the last disconnect). An operator's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` win. A worker
thread's malloc arena gives its free top back only at a free that finds it past the trim
threshold (``malloc_trim`` leaves thread arenas' tops alone), so memory a worker used once (a
zstd context of a grouping pass: megabytes) would stay with it; :func:`frees_trimmed` lowers
the threshold around such frees.

Why swap safety matters: when an export is used as swap on the same machine, the
server is on the page-out path. If its own pages are swapped out, or it blocks in
reclaim, or the OOM killer picks it, the machine deadlocks. mlockall keeps its pages
resident, PR_SET_IO_FLUSHER lets its allocations avoid recursing into I/O reclaim,
and oom_score_adj -1000 keeps the OOM killer away.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import socket
from collections.abc import Iterator
from typing import Literal

log = logging.getLogger(__name__)

# mlockall flags (<sys/mman.h>)
MCL_CURRENT = 1
MCL_FUTURE = 2
#: Lock pages only as they are faulted in (Linux 4.4+): sparse arenas and lazily committed
#: page tables stay uncommitted instead of being populated at mlockall time.
MCL_ONFAULT = 4
#: madvise advice that frees locked pages too (Linux 5.18+); plain MADV_DONTNEED fails with
#: EINVAL on mlocked memory, so a pool in a locked process must use this one.
MADV_DONTNEED_LOCKED = 24
# mallopt(3) parameters (<malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: heap allocations below this size never get a mapping of their own (see the module docstring)
MALLOC_MMAP_THRESHOLD = 4 << 20
#: free memory at the top of the heap kept for the next allocations, at most (and all of the
#: heap's free pages go back when the last client disconnects: ``Session``, ``trim_heap``)
MALLOC_TRIM_THRESHOLD = 4 << 20
#: environment variables by which an operator sets malloc's thresholds (tune_malloc then
#: leaves them alone)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
# prctl option (<linux/prctl.h>, Linux 5.6+)
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
# oom_score_adj range; -1000 disables OOM killing of the process
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_PATH = "/proc/self/oom_score_adj"
# Largest datagram we send to NOTIFY_SOCKET
SD_NOTIFY_MAX = 4096

SwapMode = Literal["off", "on", "require"]
SWAP_MODES: tuple[str, ...] = ("off", "on", "require")


class SwapSafetyError(RuntimeError):
    """Raised by apply_swap_safety('require') when a protection cannot be applied."""


_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        _libc = ctypes.CDLL(name, use_errno=True)
    return _libc


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's NOTIFY_SOCKET.

    Returns True if a datagram was sent, False if there is no NOTIFY_SOCKET or the
    send failed. An address starting with ``@`` is in the abstract namespace.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    data = state.encode()
    if len(data) > SD_NOTIFY_MAX:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(data)
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", state, exc)
        return False
    return True


def _errno_msg(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


def mlockall(current: bool = True, future: bool = True, onfault: bool = True) -> int:
    """Lock the address space in RAM. Returns 0 on success, else the errno.

    ``onfault`` adds MCL_ONFAULT (falling back without it on kernels that refuse it) so
    that reserved but untouched memory is not populated by the lock."""
    flags = (MCL_CURRENT if current else 0) | (MCL_FUTURE if future else 0)
    if flags == 0:
        return 0
    libc = _get_libc()
    if onfault and libc.mlockall(ctypes.c_int(flags | MCL_ONFAULT)) == 0:
        return 0
    if libc.mlockall(ctypes.c_int(flags)) != 0:
        return ctypes.get_errno()
    return 0


def memory_locked() -> bool:
    """True if this process has called mlockall(MCL_FUTURE) (VmFlags are per mapping; we
    check the simpler VmLck > 0 of /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError, IndexError):
        pass
    return False


def release_pages(mm: mmap.mmap, offset: int, length: int) -> None:
    """Give the pages of a private anonymous mapping back to the OS (they read as zeros).

    MADV_DONTNEED fails with EINVAL on memory locked by mlockall (``serve --swap``); then
    MADV_DONTNEED_LOCKED (Linux 5.18+) is used, which frees locked pages too and keeps the
    range locked on fault. Other errors propagate."""
    try:
        mm.madvise(mmap.MADV_DONTNEED, offset, length)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        mm.madvise(MADV_DONTNEED_LOCKED, offset, length)


#: sync_file_range(2) flags
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """sync_file_range(2): start (SYNC_FILE_RANGE_WRITE) and/or wait for writeback of a range
    of a file's dirty pages, without its metadata. Raises OSError (also where the C library
    has no such call)."""
    fn = getattr(_get_libc(), "sync_file_range", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "sync_file_range is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if fn(fd, offset, nbytes, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def trim_heap() -> None:
    """Give the free memory of the C heap, every malloc arena, back to the OS (glibc's
    ``malloc_trim(0)``); nothing where the C library has no such call."""
    trim = getattr(_get_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


#: the trim threshold tune_malloc set (None: it did not, malloc's own thresholds are in force)
_tuned_trim: int | None = None


@contextlib.contextmanager
def frees_trimmed() -> Iterator[None]:
    """Frees made in the block give the free top of their malloc arena back to the OS, a
    worker thread's arena too (module docstring); only where :func:`tune_malloc` fixed the
    thresholds (elsewhere malloc's own, or the operator's, stay untouched)."""
    trim = _tuned_trim
    fn = getattr(_get_libc(), "mallopt", None) if trim is not None else None
    if fn is None:
        yield
        return
    fn(M_TRIM_THRESHOLD, 0)
    try:
        yield
    finally:
        fn(M_TRIM_THRESHOLD, trim)


def tune_malloc() -> str:
    """Fix glibc malloc's mmap and trim thresholds (module docstring); what was done, for the
    log. Nothing where the operator set them (:data:`MALLOC_ENV`) or the C library has no
    ``mallopt`` or refuses."""
    if any(os.environ.get(k) for k in MALLOC_ENV):
        return "thresholds left to the environment"
    fn = getattr(_get_libc(), "mallopt", None)
    if fn is None:
        return "no mallopt in the C library"
    if fn(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) != 1:
        return "mallopt refused the mmap threshold"
    if fn(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) != 1:
        return "mallopt refused the trim threshold"
    global _tuned_trim
    _tuned_trim = MALLOC_TRIM_THRESHOLD
    return (
        f"mmap threshold {MALLOC_MMAP_THRESHOLD >> 20} MiB, "
        f"trim threshold {MALLOC_TRIM_THRESHOLD >> 20} MiB"
    )


def munlockall() -> int:
    """Undo mlockall. Returns 0 on success, else the errno."""
    libc = _get_libc()
    if libc.munlockall() != 0:
        return ctypes.get_errno()
    return 0


def set_io_flusher(enable: bool = True) -> int:
    """prctl(PR_SET_IO_FLUSHER): our allocations will not recurse into I/O reclaim.

    Returns 0 on success, else the errno (EPERM without CAP_SYS_RESOURCE, EINVAL on
    kernels before 5.6).
    """
    libc = _get_libc()
    zero = ctypes.c_ulong(0)
    rc = libc.prctl(
        ctypes.c_int(PR_SET_IO_FLUSHER), ctypes.c_ulong(1 if enable else 0), zero, zero, zero
    )
    if rc != 0:
        return ctypes.get_errno()
    return 0


def get_io_flusher() -> int:
    """Return 1/0 for the PR_GET_IO_FLUSHER state, or -errno if it cannot be read."""
    libc = _get_libc()
    zero = ctypes.c_ulong(0)
    rc = libc.prctl(ctypes.c_int(PR_GET_IO_FLUSHER), zero, zero, zero, zero)
    if rc < 0:
        return -ctypes.get_errno()
    return int(rc)


def set_oom_score_adj(value: int = OOM_SCORE_ADJ_MIN, path: str = OOM_SCORE_ADJ_PATH) -> int:
    """Write ``value`` to /proc/self/oom_score_adj. Returns 0 or the errno."""
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def get_oom_score_adj(path: str = OOM_SCORE_ADJ_PATH) -> int:
    with open(path) as f:
        return int(f.read().strip())


CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """True if ``cap`` (a CAP_* number) is in this process's effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def total_ram() -> int:
    """Total RAM in bytes (MemTotal from /proc/meminfo, sysconf as a fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply_swap_safety(mode: str) -> list[str]:
    """Apply the protections a swap-serving daemon needs.

    ``mode``: ``"off"`` does nothing; ``"on"`` tries each protection and returns a
    warning line per failure, naming the missing capability; ``"require"`` raises
    SwapSafetyError listing the failures instead.
    """
    if mode not in SWAP_MODES:
        raise ValueError(f"swap mode must be one of {', '.join(SWAP_MODES)}, got {mode!r}")
    if mode == "off":
        return []
    problems: list[str] = []
    err = mlockall(current=True, future=True)
    if err:
        hint = " (needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity)"
        problems.append(f"mlockall(MCL_CURRENT|MCL_FUTURE) failed: {_errno_msg(err)}{hint}")
    else:
        log.info("swap safety: memory locked (mlockall MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)")
    err = set_io_flusher(True)
    if err:
        if err == errno.EINVAL:
            hint = " (kernel older than 5.6 has no PR_SET_IO_FLUSHER)"
        else:
            hint = " (needs CAP_SYS_RESOURCE)"
        problems.append(f"prctl(PR_SET_IO_FLUSHER) failed: {_errno_msg(err)}{hint}")
    err = set_oom_score_adj(OOM_SCORE_ADJ_MIN)
    if err:
        problems.append(
            f"setting oom_score_adj to {OOM_SCORE_ADJ_MIN} failed: {_errno_msg(err)}"
            " (needs CAP_SYS_RESOURCE)"
        )
    if problems and mode == "require":
        raise SwapSafetyError("swap safety required but: " + "; ".join(problems))
    for p in problems:
        log.warning("swap safety: %s", p)
    return problems
