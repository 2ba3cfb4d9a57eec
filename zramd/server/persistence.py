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

**Restoring** is a pipeline of three stages, each on a batch of chunks
(:data:`RESTORE_BATCH_BYTES`, in three reused buffers): a thread reads and checks the file
(:class:`~zramd.persist.SnapshotReader`: header, footer and meta first, then each chunk), the
loop books the previous batch's objects in the device (slots, handles, the table at the end),
and another thread copies the batch before that into the slots it was given (the C copy, without
the GIL). A 542 MiB snapshot restored at medians of 620-680 MB/s this way, against 480-590
with the reads one chunk ahead and the copies on the loop; checking the chunks at memory speed
(:mod:`zramd.checksum`, where zlib's CRC had taken half of the reader's time) then took a cold
file from 865-921 to 1,040-1,086 MB/s on another host. What bounds it now is the first touch of
the pool's fresh pages and the loop's booking, about a third of a second each. No client can
connect yet; a failure waits for both threads before the device is thrown away. A missing file
is a fresh export (logged); a file that is not a whole snapshot, or of another geometry, is a
ConfigError naming the export and the file, and the server does not start (the device is
thrown away, never half restored).

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

**Durable mode** (``sync=flush``): the export also has a journal
(:class:`~zramd.server.durable.Journal`, opened by :func:`open_journal` after the restore). A
save to the persist file is a checkpoint: at the capture the journal starts a new generation and
the snapshot names it (:attr:`~zramd.persist.ImageMeta.journal_gen`); once the snapshot is in
place the older generations are deleted. The journal asks for a checkpoint when it has grown
enough (:func:`_checkpoint_soon`: one at a time per export, errors logged). :func:`restore`
replays, after the snapshot, the generations from the one it names on (:func:`_replay`: a torn
tail is cut off, the generations after it deleted, older ones deleted), through the device's
own write, zeroing and trim. An export in ``stop`` mode that finds journal generations (it ran
in durable mode before) replays them and is snapshotted at once, so they can go.

**Status**: each save to the export's persist file and each restore updates its
:class:`~zramd.server.exports.SnapshotStatus` (the snapshot's time and bytes, the last save's
seconds and error), which ``stat``, ``list --json`` and the metrics show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from zramd.config import ConfigError, format_size
from zramd.device.interface import DeviceError, NoSpace
from zramd.geometry import PAGE_SIZE
from zramd.persist import (
    SnapshotBusy,
    SnapshotError,
    SnapshotLock,
    SnapshotReader,
    SnapshotWriter,
    pack,
    set_aside,
)
from zramd.persist import journal as jfile
from zramd.persist.journal import JournalError, journal_files, read_journal
from zramd.persist.journal import cut as cut_journal
from zramd.persist.journal import remove as remove_journal
from zramd.server.durable import Journal
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
#: object bytes a restore stores in the device per call: consecutive chunks joined into one of
#: three reused buffers (one read, one stored, one copied into the pool). The pool books each size
#: class once per call, tens of microseconds per class: 8 MiB calls spent 0.42 s of a 542 MiB
#: restore booking, 32 MiB calls 0.26 s
RESTORE_BATCH_BYTES = 32 << 20


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


async def save(
    exp: Export, path: str | None = None, final: bool = False, leftover_gen: int = 0
) -> SnapshotInfo:
    """Snapshot ``exp`` to ``path`` (default: its ``persist`` file) at this point in time;
    ``final``: the export is closed after it (its pages written back stay pinned until then).
    A snapshot to the persist file is a checkpoint of the journal (durable mode), or, given
    ``leftover_gen``, replaces journal generations older than that one (found at start in
    ``stop`` mode). Raises ConfigError (no path), DeviceError (device reset or closed
    meanwhile) or OSError."""
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
            info = await _save(exp, path, final, leftover_gen)
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


async def _save(exp: Export, path: str, final: bool, leftover_gen: int = 0) -> SnapshotInfo:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    meta, src = exp.device.snapshot_image(final)
    if path == exp.config.persist:
        # a checkpoint: the snapshot holds every record before this moment
        meta.journal_gen = exp.journal.rotate(final) if exp.journal is not None else leftover_gen
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
            if meta.backing and exp.backing is not None:
                # the pages it references in the backing store must outlive a power loss too
                await loop.run_in_executor(None, exp.backing.datasync)
            await loop.run_in_executor(None, writer.commit)
            if path == exp.config.persist and exp.journal is not None:
                # before the capture ends (it pins): what the checkpoint references stays
                exp.device.hold_image(meta)
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
    if path == exp.config.persist and meta.journal_gen:
        if exp.journal is not None:
            exp.journal.checkpointed(meta.journal_gen, writer.written)
        else:
            await loop.run_in_executor(None, _remove_journals, path, meta.journal_gen)
    return info


def _remove_journals(path: str, before: int) -> None:
    """Delete the journal generations beside ``path`` older than ``before``."""
    for gen, jpath in journal_files(path):
        if gen < before:
            remove_journal(jpath)


class SnapshotRefused(ConfigError):
    """The snapshot file cannot be restored: not a whole snapshot of this format, of another
    geometry, or inconsistent (what ``--discard-snapshot`` sets aside)."""


async def restore(exp: Export) -> tuple[int, list[tuple[int, int]]]:
    """Restore ``exp`` from its persist file into its (empty) device, then replay its journal;
    returns the generation the next journal starts with (0: no snapshot, no journal) and the
    (generation, bytes) of the journal files kept. Raises
    SnapshotRefused (a bad or foreign file) or ConfigError (a file could not be read, no
    room), naming the export and the file."""
    path = exp.config.persist
    assert path is not None
    first = await _restore_snapshot(exp, path)
    return await _replay(exp, path, max(first, 0))


async def _restore_snapshot(exp: Export, path: str) -> int:
    """The snapshot part of :func:`restore`: the journal generation the snapshot names, or -1
    without a snapshot."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    try:
        reader = await loop.run_in_executor(None, SnapshotReader, path)
    except FileNotFoundError:
        log.info("export %s: no snapshot %s yet", exp.name, path)
        return -1
    except SnapshotError as e:
        raise SnapshotRefused(f"export {exp.name!r}: {e}") from None
    except OSError as e:
        raise ConfigError(f"export {exp.name!r}: snapshot {path}: {e.strerror}") from None
    pending: asyncio.Future[Any] | None = None
    copying: asyncio.Future[None] | None = None
    try:
        sink = exp.device.restore_image(reader.meta)
        # three batches in hand: one copied into the device, one stored, one read
        chunks = reader.chunks(batch=RESTORE_BATCH_BYTES, buffers=3)
        pending = loop.run_in_executor(None, next, chunks, None)
        while True:
            chunk = await pending
            if chunk is None:
                break
            pending = loop.run_in_executor(None, next, chunks, None)
            copy = sink.put(*chunk)
            if copying is not None:
                await copying
            copying = loop.run_in_executor(None, copy)
        if copying is not None:
            await copying
        sink.finish()
        if exp.config.sync == "flush":
            exp.device.hold_image(reader.meta)  # the checkpoint a crash would restart from
    except SnapshotError as e:
        raise SnapshotRefused(f"export {exp.name!r}: {e}") from None
    except ValueError as e:
        raise SnapshotRefused(f"export {exp.name!r}: snapshot {path}: {e}") from None
    except (NoSpace, DeviceError) as e:
        raise ConfigError(f"export {exp.name!r}: snapshot {path}: {e}") from None
    finally:
        # threads may still be reading the next batch, or copying into the device
        for fut in (pending, copying):
            if fut is not None:
                with contextlib.suppress(BaseException):
                    await fut
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
    return reader.meta.journal_gen


async def _replay(exp: Export, path: str, first: int) -> tuple[int, list[tuple[int, int]]]:
    """Apply the journal generations from ``first`` on to the device, in order; delete older
    ones. A generation's torn tail is cut off (the file truncated to its whole frames) and the
    generations after it deleted: they hold nothing a FLUSH acknowledged (a FLUSH syncs every
    generation still open). Returns the generation the next journal starts with (0: none
    found and ``first`` 0) and the (generation, bytes) of the files kept."""
    loop = asyncio.get_running_loop()
    files = await loop.run_in_executor(None, journal_files, path)
    nxt = first
    cut = False
    t0 = time.perf_counter()
    records = 0
    kept: list[tuple[int, int]] = []
    dev = exp.device
    for gen, jpath in files:
        nxt = max(nxt, gen + 1)
        if gen < first or cut:
            await loop.run_in_executor(None, remove_journal, jpath)
            if cut:
                log.warning("export %s: journal %s follows a torn one: deleted", exp.name, jpath)
            continue
        try:
            got = await loop.run_in_executor(None, read_journal, jpath)
        except JournalError as e:
            raise SnapshotRefused(f"export {exp.name!r}: {e}") from None
        except OSError as e:
            raise ConfigError(f"export {exp.name!r}: journal {jpath}: {e.strerror}") from None
        head = got.header
        if head is not None and (head.size, head.page_size) != (dev.size, PAGE_SIZE):
            raise SnapshotRefused(
                f"export {exp.name!r}: journal {jpath}: of an export of {head.size} bytes "
                f"({head.page_size}-byte pages), this one is {dev.size}"
            )
        try:
            for kind, offset, length, data in got.records:
                if offset + length > dev.size:
                    raise SnapshotRefused(
                        f"export {exp.name!r}: journal {jpath}: a record past the export's end"
                    )
                if kind == jfile.WRITE:
                    await dev.write(offset, data)
                elif kind == jfile.ZERO:
                    await dev.write_zeroes(offset, length)
                elif kind == jfile.TRIM:
                    await dev.trim(offset, length)
                else:
                    dev.reset()
        except (NoSpace, DeviceError) as e:
            raise ConfigError(f"export {exp.name!r}: journal {jpath}: {e}") from None
        records += len(got.records)
        kept.append((gen, got.good_bytes))
        if got.torn:
            cut = True
            await loop.run_in_executor(None, cut_journal, jpath, got.good_bytes)
            log.warning(
                "export %s: journal %s: its tail after %d whole frames cut off (a write the "
                "crash interrupted, never acknowledged by a FLUSH)",
                exp.name,
                jpath,
                got.frames,
            )
    if files:
        log.info(
            "export %s: replayed %d journal records in %.2fs",
            exp.name,
            records,
            time.perf_counter() - t0,
        )
    return nxt, kept


async def restore_all(registry: ExportRegistry, discard: bool = False) -> None:
    """Restore every export that has a persist file (server start, before listening); with
    ``discard``, an export whose file is refused starts empty and the file is set aside."""
    for exp in registry:
        path = exp.config.persist
        if path is None:
            continue
        try:
            nxt, kept = await restore(exp)
        except SnapshotRefused as e:
            if not discard:
                raise
            asides = [set_aside(p) for p in [path, *(j for _g, j in journal_files(path))]
                      if os.path.exists(p)]
            log.warning(
                "%s; discarded (--discard-snapshot): renamed to %s, export %s starts empty",
                e,
                ", ".join(asides),
                exp.name,
            )
            exp = registry.renew(exp.name)
            nxt, kept = 0, []
        await open_journal(exp, nxt, kept)


async def restore_one(exp: Export) -> None:
    """An export with a persist file created on a running daemon (``zramd create
    --persist``): restored (snapshot, journal), then its journal opened. Raises what
    :func:`restore` raises; the caller removes the export."""
    nxt, kept = await restore(exp)
    await open_journal(exp, nxt, kept)


async def open_journal(exp: Export, nxt: int, kept: list[tuple[int, int]]) -> None:
    """After its restore: give an export in durable mode its journal, starting at generation
    ``nxt``, the generations ``kept`` on disk deleted by its first checkpoint; an export in
    ``stop`` mode that found journal generations (it ran durable before) is snapshotted at
    once, so they can go."""
    path = exp.config.persist
    assert path is not None
    if exp.config.sync == "flush":
        journal = Journal(exp.name, path, exp.device.size, PAGE_SIZE, max(nxt, 1), tuple(kept))
        if exp.snapshot is not None and exp.snapshot.file_bytes:
            journal.checkpoint_bytes = max(journal.checkpoint_bytes, exp.snapshot.file_bytes)
        journal.on_due = lambda: _checkpoint_soon(exp)
        exp.journal = journal
    elif kept:
        await save(exp, leftover_gen=nxt)


#: the checkpoints running, by export (one at a time each)
_checkpoints: dict[int, asyncio.Task[None]] = {}


async def checkpoints_done() -> None:
    """Wait for the checkpoints running (their errors are logged by them)."""
    await asyncio.gather(*_checkpoints.values(), return_exceptions=True)


def _checkpoint_soon(exp: Export) -> None:
    """Start a checkpoint of ``exp`` (its journal asked for one) unless one runs."""
    task = _checkpoints.get(id(exp))
    if task is not None and not task.done():
        return
    _checkpoints[id(exp)] = asyncio.get_running_loop().create_task(_checkpoint(exp))


async def _checkpoint(exp: Export) -> None:
    try:
        await save(exp)
    except (OSError, DeviceError, ConfigError) as e:
        log.error("export %s: checkpoint to %s failed: %s", exp.name, exp.config.persist, e)
    finally:
        _checkpoints.pop(id(exp), None)
        if exp.journal is not None:
            exp.journal.checkpoint_done()


async def save_all(registry: ExportRegistry) -> None:
    """Snapshot every export that has a persist file (server stop): background policies are
    stopped first, systemd's stop timeout is extended by each save's worst case; a failure is
    logged and the others are still saved."""
    await checkpoints_done()
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
