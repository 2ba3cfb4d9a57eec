"""Durable mode (``persist=PATH,sync=flush``): the journal that makes a FLUSH mean stable storage.

Theory of operation
-------------------
An export in durable mode has a :class:`Journal` (its files: :mod:`zramd.persist.journal`).
Dispatch calls :meth:`Journal.write`, :meth:`Journal.zero`, :meth:`Journal.trim` for every
write, zeroing and trim the device completed, on the loop thread, right when the device call
returned (nothing else can run in between, so for overlapping requests the journal's order is
the device's), and :meth:`Journal.sync` before it answers a FLUSH, or a request with FUA.
``zramd reset`` records a RESET.

**Records are buffered and written in frames.** A record is kept in memory (a WRITE's data
copied) until :data:`FRAME_BYTES` have gathered or a sync comes; then they become one frame,
appended by the journal's own thread (one thread: file operations run in the order they were
asked for, off the loop). :meth:`Journal.sync` hands the records gathered so far to that thread
and then an ``fdatasync`` of every generation still open, and returns when it is done: every
write completed before the FLUSH is then on stable storage. Concurrent syncs share one
``fdatasync`` when no frame was appended in between (group commit). When more than
:data:`MAX_BACKLOG` bytes wait for the thread, writes wait for it (:attr:`Journal.backlogged`:
the inline path declines them, the awaited path waits in :meth:`Journal.drain`), so the memory
the journal holds is bounded.

**Checkpoints clean the journal.** A snapshot of the export to its persist file is a checkpoint
(:mod:`zramd.server.persistence`): at the capture, on the loop thread, :meth:`Journal.rotate`
closes the generation (its last records are handed to the thread) and starts the next one; the
snapshot names that next generation as the first it does not contain; once the snapshot is
committed (renamed in place, synced), :meth:`Journal.checkpointed` deletes the older
generations. When the journal written since the last checkpoint passes
:attr:`Journal.checkpoint_bytes` (the larger of :data:`MIN_CHECKPOINT_BYTES` and the last
snapshot's size), :attr:`Journal.on_due` asks for a checkpoint, once. The disk then holds at
most the snapshot, the one being written beside it, and the journal: ``checkpoint_bytes`` plus
what clients write while a checkpoint runs. A crash at any point leaves a snapshot and the
generations from the one it names on, all whole but the tail of the last.

**Faults.** A journal write or sync that fails (EIO, a full disk) fails the FLUSH or FUA
request that waits for it with EIO, and every later one, until a checkpoint succeeds (then
what the failed generation missed is in the snapshot); the journal logs the error once and
asks for that checkpoint, and again every :data:`CHECKPOINT_RETRY` seconds while checkpoints
fail (:meth:`Journal.checkpoint_done`). Clients' data stays in RAM and is served meanwhile.

Knows nothing of the device, of requests or of the protocol: offsets, lengths and bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from zramd.device.interface import Buffer, DeviceIOError
from zramd.persist import journal as jfile
from zramd.persist.journal import RECORD, RESET, TRIM, WRITE, ZERO, JournalFile, Record

log = logging.getLogger("zramd.server")

#: records gathered before they are handed to the thread as one frame (without a sync)
FRAME_BYTES = 1 << 20
#: bytes handed to the thread and not yet written past which writes wait
MAX_BACKLOG = 64 << 20
#: the journal may grow to at least this much before a checkpoint is asked for
MIN_CHECKPOINT_BYTES = 256 << 20
#: seconds before a checkpoint still needed (the last one failed) is asked for again
CHECKPOINT_RETRY = 10.0


@dataclass
class _Gen:
    """One generation: its number, its file once the thread made it, and whether frames were
    appended to it since its last sync."""

    generation: int
    file: JournalFile | None = None
    dirty: bool = False
    bytes: int = 0
    #: bytes of the file on stable storage (its last sync)
    synced: int = 0


class JournalFailed(DeviceIOError):
    """The journal could not be written or synced: a FLUSH cannot promise anything."""


class Journal:
    """The journal of one durable export (see the module doc). Loop thread only, but for the
    methods its thread runs."""

    def __init__(
        self,
        name: str,
        snapshot: str,
        size: int,
        page_size: int,
        generation: int,
        kept: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """The journal beside ``snapshot`` from ``generation`` on; ``kept``: the (generation,
        bytes) of older generations on disk (replayed at the start), deleted by the next
        checkpoint."""
        self.name = name
        self.snapshot = snapshot
        self.size = size
        self.page_size = page_size
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="zramd-journal")
        self._loop = asyncio.get_running_loop()
        self._gen = _Gen(generation)
        #: generations before the current one still on disk (deleted by a checkpoint)
        self._old: list[_Gen] = [_Gen(g, bytes=n, synced=n) for g, n in kept]
        self._pending: list[Record] = []
        self._pending_bytes = 0
        #: a sync asked for after the last frame was handed over (syncs share it)
        self._queued_sync: asyncio.Future[Any] | None = None
        self._backlog = 0
        self._drained: asyncio.Event = asyncio.Event()
        self._drained.set()
        #: the first failure since the last checkpoint, and the generation it happened in
        self.error: str = ""
        self._error_gen = 0
        #: asks for a checkpoint (set by the server); called once per generation
        self.on_due: Callable[[], None] | None = None
        self._due_asked = False
        self.checkpoint_bytes = MIN_CHECKPOINT_BYTES
        #: counters for stat and the metrics
        self.records = 0
        self.frames = 0
        self.syncs = 0
        self.sync_ns = 0
        #: fdatasync calls made (concurrent syncs share one)
        self.datasyncs = 0
        self.checkpoints = 0
        #: when the running checkpoint's capture was (perf_counter; 0: none runs), and how long
        #: the last committed one took
        self._checkpoint_since = 0.0
        self.last_checkpoint_seconds = 0.0
        self._closed = False
        self._submit(self._create, self._gen)

    # -- the loop thread ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._gen.generation

    @property
    def bytes(self) -> int:
        """Bytes of the journal on disk (every generation still kept)."""
        return self._gen.bytes + sum(g.bytes for g in self._old)

    @property
    def backlogged(self) -> bool:
        """Whether writes must wait for the thread (:meth:`drain`) before they run."""
        return self._backlog >= MAX_BACKLOG

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return self._loop.run_in_executor(self._ex, fn, *args)

    def _add(self, record: Record, nbytes: int) -> None:
        self._pending.append(record)
        self._pending_bytes += nbytes
        self.records += 1
        if self._pending_bytes >= FRAME_BYTES:
            self._hand_over()

    def write(self, offset: int, data: Buffer) -> None:
        """A write the device completed (its data is copied)."""
        n = len(data)
        self._add((WRITE, offset, n, bytes(data)), RECORD.size + n)

    def zero(self, offset: int, length: int) -> None:
        """A WRITE_ZEROES the device completed."""
        self._add((ZERO, offset, length, b""), RECORD.size)

    def trim(self, offset: int, length: int) -> None:
        """A TRIM the device completed."""
        self._add((TRIM, offset, length, b""), RECORD.size)

    def reset(self) -> None:
        """The device was reset (emptied)."""
        self._add((RESET, 0, 0, b""), RECORD.size)

    def _hand_over(self) -> None:
        if not self._pending:
            return
        records, n = self._pending, self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        self._backlog += n
        self._drained.clear()
        self._queued_sync = None
        fut = self._submit(self._append, self._gen, records)
        fut.add_done_callback(lambda _f: self._written(n))

    def _written(self, n: int) -> None:
        self._backlog -= n
        if self._backlog < MAX_BACKLOG:
            self._drained.set()
        if self.bytes >= self.checkpoint_bytes and not self._due_asked:
            self._ask_checkpoint()

    def _ask_checkpoint(self) -> None:
        if self._closed:
            return
        self._due_asked = True
        if self.on_due is not None:
            self.on_due()

    def checkpoint_done(self) -> None:
        """The checkpoint asked for has ended (committed or failed): when the journal still
        needs one (it failed, or is still past its size), ask again in
        :data:`CHECKPOINT_RETRY` seconds."""
        self._due_asked = False
        if self.error or self.bytes >= self.checkpoint_bytes:
            self._loop.call_later(CHECKPOINT_RETRY, self._recheck)

    def _recheck(self) -> None:
        if not self._due_asked and (self.error or self.bytes >= self.checkpoint_bytes):
            self._ask_checkpoint()

    async def drain(self) -> None:
        """Wait until the thread's backlog is below :data:`MAX_BACKLOG`."""
        while self.backlogged:
            await self._drained.wait()

    async def sync(self) -> None:
        """Return once every record so far is on stable storage; raises JournalFailed."""
        if self.error:
            raise JournalFailed(f"journal of export {self.name}: {self.error}")
        self._hand_over()
        fut = self._queued_sync
        if fut is None:
            fut = self._queued_sync = self._submit(self._sync_all, [*self._old, self._gen])
        t0 = time.perf_counter_ns()
        await asyncio.shield(fut)
        self.syncs += 1
        self.sync_ns += time.perf_counter_ns() - t0
        if self.error:
            raise JournalFailed(f"journal of export {self.name}: {self.error}")

    def rotate(self, final: bool = False) -> int:
        """At a checkpoint's capture: close this generation and start the next (unless
        ``final``: the export closes after the snapshot); returns the next generation."""
        self._hand_over()
        self._checkpoint_since = time.perf_counter()
        old = self._gen
        self._old.append(old)
        self._gen = _Gen(old.generation + 1)
        self._queued_sync = None
        if not final:
            self._submit(self._create, self._gen)
        return self._gen.generation

    def checkpointed(self, generation: int, snapshot_bytes: int) -> None:
        """A snapshot naming ``generation`` is committed: delete the generations before it."""
        gone = [g for g in self._old if g.generation < generation]
        self._old = [g for g in self._old if g.generation >= generation]
        if gone:
            self._submit(self._delete, gone)
        self.checkpoints += 1
        if self._checkpoint_since:
            self.last_checkpoint_seconds = time.perf_counter() - self._checkpoint_since
            self._checkpoint_since = 0.0
        self.checkpoint_bytes = max(MIN_CHECKPOINT_BYTES, snapshot_bytes)
        self._due_asked = False
        if self.error and self._error_gen < generation:
            log.info("export %s: journal usable again after the checkpoint", self.name)
            self.error = ""

    def close(self) -> None:
        """Hand over what is gathered, sync every generation kept and close them (blocks until
        the thread is done: at stop, after the last snapshot)."""
        if self._closed:
            return
        self._closed = True
        self._hand_over()
        self._ex.submit(self._sync_all, [*self._old, self._gen])
        self._ex.submit(self._close_all, [*self._old, self._gen])
        self._ex.shutdown(wait=True)

    def synced(self) -> dict[int, int]:
        """Per generation on disk, its bytes on stable storage."""
        return {g.generation: g.synced for g in (*self._old, self._gen)}

    def as_dict(self) -> dict[str, Any]:
        """The journal's figures for ``stat`` and ``list --json``."""
        return {
            "generation": self.generation,
            "bytes": self.bytes,
            "generations": len(self._old) + 1,
            "checkpoint_bytes": self.checkpoint_bytes,
            "records": self.records,
            "frames": self.frames,
            "syncs": self.syncs,
            "datasyncs": self.datasyncs,
            "sync_us": self.sync_ns // 1000,
            "sync_avg_ms": round(self.sync_ns / self.syncs / 1e6, 3) if self.syncs else 0.0,
            "checkpoints": self.checkpoints,
            "checkpoint_running_seconds": round(
                time.perf_counter() - self._checkpoint_since, 3
            )
            if self._checkpoint_since
            else 0.0,
            "last_checkpoint_seconds": round(self.last_checkpoint_seconds, 3),
            "backlog_bytes": self._backlog + self._pending_bytes,
            "unsynced_bytes": self.bytes - sum(self.synced().values()),
            "failed": int(bool(self.error)),
            "error": self.error,
        }

    # -- the journal's thread ---------------------------------------------------------------

    def _fail(self, gen: _Gen, what: str, e: OSError) -> None:
        if not self.error:
            self.error = f"{what} {jfile.journal_path(self.snapshot, gen.generation)}: {e.strerror}"
            self._error_gen = gen.generation
            log.error("export %s: %s; FLUSH fails until a checkpoint", self.name, self.error)
            self._loop.call_soon_threadsafe(self._ask_checkpoint)

    def _create(self, gen: _Gen) -> None:
        try:
            gen.file = JournalFile(self.snapshot, gen.generation, self.size, self.page_size)
            gen.bytes = gen.synced = gen.file.written
        except OSError as e:
            self._fail(gen, "cannot create", e)

    def _append(self, gen: _Gen, records: list[Record]) -> None:
        if gen.file is None:
            return  # its creation failed: the error is set
        try:
            gen.file.append(records)
            gen.dirty = True
            self.frames += 1
        except OSError as e:
            self._fail(gen, "cannot write", e)
        finally:
            gen.bytes = gen.file.written

    def _sync_all(self, gens: list[_Gen]) -> None:
        for gen in gens:
            if gen.file is None or not gen.dirty:
                continue
            try:
                size = gen.file.written
                gen.file.sync()
                self.datasyncs += 1
                gen.dirty = False
                gen.synced = size
            except OSError as e:
                self._fail(gen, "cannot sync", e)

    def _delete(self, gens: list[_Gen]) -> None:
        for gen in gens:
            if gen.file is not None:
                gen.file.close()
            try:
                jfile.remove(jfile.journal_path(self.snapshot, gen.generation))
            except OSError as e:
                log.warning(
                    "export %s: cannot delete journal %s: %s",
                    self.name,
                    jfile.journal_path(self.snapshot, gen.generation),
                    e.strerror,
                )

    def _close_all(self, gens: list[_Gen]) -> None:
        for gen in gens:
            if gen.file is not None:
                gen.file.close()
