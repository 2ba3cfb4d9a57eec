"""When exports are snapshotted and restored: start, stop, destroy, and ``zramd snapshot``.

Theory of operation
-------------------
An export with ``persist=PATH`` is restored from PATH when the server starts, before any
listener binds (:func:`restore_all`), and written to PATH when the server stops (after the
requests in flight finished and the connections closed, before the devices close:
:func:`save_all`) and when ``zramd destroy`` removes it (:func:`destroy`). ``zramd snapshot
NAME [PATH]`` writes one while clients go on (:func:`save`). Saves of one export run one after
the other.

**Pages written back** to a backing store are referenced by locator, not copied
(:mod:`zramd.device.image`); the store is pinned while the image is taken (no locator freed),
and at stop and destroy (``final``) until the export closes, so the records the file names are
in the backing file when the next start opens it with them live (the registry does:
:mod:`zramd.server.exports`). A ``zramd snapshot`` of a running export pins only while it is
written: the daemon then goes on freeing and reusing locators, so after a crash that live
snapshot restores only while the segments it references were not given back and written again
meanwhile (each page's segment generation is checked): else the restore refuses it (one line;
``--discard-snapshot`` starts empty), never serving other data. A normal stop writes a new one.

**Saving** takes the device's image (:meth:`~zramd.device.interface.BlockDevice.snapshot_image`:
the table is copied in one step, the pause clients see) and then the objects in slices of
:data:`SLICE_BYTES` (a fraction of a millisecond of loop time each, copied out and joined, a
yield between two), while a thread of the loop's default executor checksums and writes the
previous :data:`CHUNK_BYTES` to the file
(:class:`~zramd.persist.SnapshotWriter`: beside the target, fsync, rename, fsync of the
directory). The device keeps the image at its point in time whatever clients write meanwhile
(copy on free, :mod:`zramd.device.image`). Each save logs one line: pages, objects, bytes,
seconds, and the longest hold of the loop (the capture or a slice).

**Restoring** reads and checks the file in a thread (:class:`~zramd.persist.SnapshotReader`:
header, footer and meta first, then each chunk) while the loop stores the previous chunk's
objects in the device; no client can connect yet. A missing file is a fresh export (logged); a
file that is not a whole snapshot, or of another geometry, is a ConfigError naming the export
and the file, and the server does not start (the device is thrown away, never half restored).

**Discarding** (``zramd serve --discard-snapshot``, for this start only): a file that is not a
whole snapshot of this format, or of another geometry, or inconsistent, is renamed aside to
``PATH.bad-YYYYmmddTHHMMSSZ`` (never deleted) and the export starts empty in its place
(:meth:`~zramd.server.exports.ExportRegistry.renew`), with one warning naming both files. A file
that could not be read (an OSError) or does not fit the memory limit is not discarded: the
file may be good, the operator fixes the cause.

**Locks**: an export holds its file's lock while it exists (:mod:`zramd.persist.lock`, taken
by the registry); ``zramd snapshot NAME PATH`` to another file takes that file's lock for the
save, so it cannot overwrite the file of another export or daemon.

**Stop timeout**: under systemd a stop that outlasts ``TimeoutStopSec`` is killed, and a
killed save leaves the previous snapshot. Before each export's save at stop, :func:`save_all`
asks systemd for :func:`save_seconds` of that export more (``EXTEND_TIMEOUT_USEC``, systemd
236 or later): the export's size at :data:`WORST_SAVE_RATE`, plus :data:`SAVE_MARGIN`; so the
unit's own ``TimeoutStopSec`` only has to cover the drain before the first save (the rule is in
systemd/zramd.service and docs/install.md).

**Status**: each save to the export's persist file and each restore updates its
:class:`~zramd.server.exports.SnapshotStatus` (the snapshot's time and bytes, the last save's
seconds and error), which ``stat``, ``list --json`` and the metrics show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from zramd.config import ConfigError, format_size
from zramd.device.interface import DeviceError, NoSpace
from zramd.persist import (
    SnapshotBusy,
    SnapshotError,
    SnapshotLock,
    SnapshotReader,
    SnapshotWriter,
    pack,
    set_aside,
)
from zramd.server.exports import Export, ExportRegistry
from zramd.system import sd_notify

log = logging.getLogger("zramd.server")

#: object bytes copied out of the device per slice of loop time (about 0.3 ms)
SLICE_BYTES = 1 << 20
#: object bytes per chunk written to the file (one write in a thread while the next is copied).
#: Each slice's objects are joined into one piece on the loop thread (about 0.1 ms per MiB),
#: so the writer thread only checksums and writes, which release the GIL: a thread that joined
#: them would hold the GIL and the loop would wait for it
CHUNK_BYTES = 8 << 20


#: the slowest a save runs, in bytes of export size per second (the worst case measured:
#: incompressible data, the file written at the disk's speed; most saves write far less)
WORST_SAVE_RATE = 200 * 10**6
#: seconds added to each export's estimate (capture, fsync, rename, a slow disk's stalls)
SAVE_MARGIN = 10.0


def save_seconds(size: int) -> float:
    """How long a save of an export of ``size`` bytes may take at worst."""
    return SAVE_MARGIN + size / WORST_SAVE_RATE


#: one save at a time per device: a second (``zramd snapshot`` twice, or the stop's while one
#: runs) waits for the first
_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass
class SnapshotInfo:
    """What one save wrote: the file, its bytes, the export's live pages and stored objects,
    the seconds it took, how long the capture held the loop and the longest hold of all
    (capture or slice)."""

    path: str
    file_bytes: int
    pages: int
    objects: int
    object_bytes: int
    seconds: float
    capture_pause: float
    longest_pause: float
    #: wall-clock time of the capture (the snapshot's moment)
    created: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "pages": self.pages,
            "objects": self.objects,
            "object_bytes": self.object_bytes,
            "seconds": round(self.seconds, 3),
            "capture_pause_ms": round(self.capture_pause * 1e3, 3),
            "longest_pause_ms": round(self.longest_pause * 1e3, 3),
        }


async def save(exp: Export, path: str | None = None, final: bool = False) -> SnapshotInfo:
    """Snapshot ``exp`` to ``path`` (default: its ``persist`` file) at this point in time;
    ``final``: the export is closed after it (its pages written back stay pinned until then).
    Raises ConfigError (no path), DeviceError (device reset or closed meanwhile) or OSError."""
    path = path or exp.config.persist
    if path is None:
        raise ConfigError(f"export {exp.name!r} has no persist file: give a path")
    own = path == exp.config.persist
    file_lock: SnapshotLock | None = None
    if not own:
        try:
            file_lock = SnapshotLock(path)
        except SnapshotBusy as e:
            raise ConfigError(str(e)) from None
    lock = _locks.setdefault(exp.device, asyncio.Lock())
    t0 = time.perf_counter()
    try:
        async with lock:
            info = await _save(exp, path, final)
    except BaseException as e:
        if own and exp.snapshot is not None and isinstance(e, Exception):
            st = exp.snapshot
            st.last_seconds = time.perf_counter() - t0
            st.last_error = str(e) or type(e).__name__
            st.failures += 1
        raise
    finally:
        if file_lock is not None:
            file_lock.release()
    if own and exp.snapshot is not None:
        st = exp.snapshot
        st.created, st.file_bytes = info.created, info.file_bytes
        st.last_seconds, st.last_error = info.seconds, ""
        st.saves += 1
    return info


async def _save(exp: Export, path: str, final: bool) -> SnapshotInfo:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    meta, src = exp.device.snapshot_image(final)
    longest = capture = time.perf_counter() - t0
    pages = int((meta.table[0] != 0).sum())
    try:
        writer = await loop.run_in_executor(None, SnapshotWriter, path)
        pending = loop.run_in_executor(None, writer.write_meta, meta)
        try:
            while True:
                pieces: list[tuple[bytes, bytes]] = []
                n = 0
                while n < CHUNK_BYTES:
                    t = time.perf_counter()
                    objs = src.take(SLICE_BYTES)
                    if not objs:
                        break
                    piece = pack(objs)
                    longest = max(longest, time.perf_counter() - t)
                    pieces.append(piece)
                    n += len(piece[1])
                    await asyncio.sleep(0)
                await pending
                if not pieces:
                    break
                pending = loop.run_in_executor(None, writer.write_pieces, pieces)
            await loop.run_in_executor(None, writer.commit)
        except BaseException:
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
            await loop.run_in_executor(None, writer.abort)
            raise
    finally:
        src.close()
    info = SnapshotInfo(
        path,
        writer.written,
        pages,
        meta.objects,
        meta.object_bytes,
        time.perf_counter() - t0,
        capture,
        longest,
        meta.created,
    )
    log.info(
        "export %s: snapshot %s: %d pages, %d objects, %s in %.2fs (longest pause %.1f ms)",
        exp.name,
        path,
        pages,
        meta.objects,
        format_size(writer.written),
        info.seconds,
        longest * 1e3,
    )
    return info


class SnapshotRefused(ConfigError):
    """The snapshot file cannot be restored: not a whole snapshot of this format, of another
    geometry, or inconsistent (what ``--discard-snapshot`` sets aside)."""


async def restore(exp: Export) -> bool:
    """Restore ``exp`` from its persist file into its (empty) device; False when there is no
    file. Raises SnapshotRefused (a bad or foreign file) or ConfigError (the file could not be
    read, no room), naming the export and the file."""
    path = exp.config.persist
    assert path is not None
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    try:
        reader = await loop.run_in_executor(None, SnapshotReader, path)
    except FileNotFoundError:
        log.info("export %s: no snapshot %s yet: starting empty", exp.name, path)
        return False
    except SnapshotError as e:
        raise SnapshotRefused(f"export {exp.name!r}: {e}") from None
    except OSError as e:
        raise ConfigError(f"export {exp.name!r}: snapshot {path}: {e.strerror}") from None
    pending: asyncio.Future[Any] | None = None
    try:
        sink = exp.device.restore_image(reader.meta)
        chunks = reader.chunks()
        pending = loop.run_in_executor(None, next, chunks, None)
        while True:
            objs = await pending
            if objs is None:
                break
            pending = loop.run_in_executor(None, next, chunks, None)
            sink.put(objs)
        sink.finish()
    except SnapshotError as e:
        raise SnapshotRefused(f"export {exp.name!r}: {e}") from None
    except ValueError as e:
        raise SnapshotRefused(f"export {exp.name!r}: snapshot {path}: {e}") from None
    except (NoSpace, DeviceError) as e:
        raise ConfigError(f"export {exp.name!r}: snapshot {path}: {e}") from None
    finally:
        if pending is not None:  # the thread may still be reading the next chunk
            with contextlib.suppress(BaseException):
                await pending
        reader.close()
    if exp.snapshot is not None:
        exp.snapshot.created, exp.snapshot.file_bytes = reader.meta.created, reader.file_size
    log.info(
        "export %s: restored %s (%s, %d objects) in %.2fs",
        exp.name,
        path,
        format_size(reader.file_size),
        reader.meta.objects,
        time.perf_counter() - t0,
    )
    return True


async def restore_all(registry: ExportRegistry, discard: bool = False) -> None:
    """Restore every export that has a persist file (server start, before listening); with
    ``discard``, an export whose file is refused starts empty and the file is set aside."""
    for exp in registry:
        path = exp.config.persist
        if path is None:
            continue
        try:
            await restore(exp)
        except SnapshotRefused as e:
            if not discard:
                raise
            aside = set_aside(path)
            log.warning(
                "%s; discarded (--discard-snapshot): renamed to %s, export %s starts empty",
                e,
                aside,
                exp.name,
            )
            registry.renew(exp.name)


async def save_all(registry: ExportRegistry) -> None:
    """Snapshot every export that has a persist file (server stop): background policies are
    stopped first, systemd's stop timeout is extended by each save's worst case; a failure is
    logged and the others are still saved."""
    for exp in registry:
        if exp.config.persist is None:
            continue
        if exp.policy is not None:
            await exp.policy.stop()
        sd_notify(f"EXTEND_TIMEOUT_USEC={int(save_seconds(exp.device.size) * 1e6)}")
        try:
            await save(exp, final=True)
        except (OSError, DeviceError, ConfigError) as e:
            log.error("export %s: snapshot %s failed: %s", exp.name, exp.config.persist, e)


class Detaching(Protocol):
    """What :func:`destroy` needs of the registry."""

    def detach(self, name: str, force: bool = False) -> tuple[Any, list[Any]]: ...


async def destroy(registry: Detaching, name: str, force: bool) -> None:
    """Remove export ``name`` (as :meth:`ExportRegistry.remove`); one with a persist file is
    snapshotted once its last request finished, then closed. Raises ExportBusy, KeyError, or
    what :func:`save` raises (the export is gone either way)."""
    exp, busy = registry.detach(name, force)
    try:
        await asyncio.gather(*(s.wait_idle() for s in busy))
        if exp.config.persist is not None:
            await save(exp, final=True)
    finally:
        exp.close()
