"""The export registry: which named exports exist, and the device behind each.

Theory of operation
-------------------
:class:`ExportRegistry` owns every :class:`Export` of a server process (config + device + the
sessions attached to it). It implements the protocol's :class:`~zramd.protocol.events.ExportCatalog`
(``lookup`` / ``list_exports``), so the handshake learns about exports only through it. The empty
name is the default export: the one named by ``default`` if set, else the first one added.

All exports of a registry share one codec executor (a small thread pool created by the server)
and, when a global memory limit is set, one memory budget, both handed to each device. Every
connection to an export uses the same device object, which is what makes CAN_MULTI_CONN honest.

A device whose page table cannot be reserved (an export of many terabytes: the table is
address space, 12 bytes per page) is refused by ``add`` with a one-line ConfigError naming the
export, its size and the table's size, so ``serve`` exits with that line, ``create`` answers it
and a reload logs it; the registry is unchanged.

An export whose configuration asks for background recompression (``recompress-after``) gets a
:class:`~zramd.device.tiers.TierPolicy` task: started by ``add`` when a loop runs, else by
:meth:`ExportRegistry.start` (the server's start), cancelled by ``remove`` and ``close``; it
backs off while the export's clients are busy.

An export with ``backing`` gets its :class:`~zramd.backing.BackingStore`, opened by ``add``
before the device is made and closed after it; the device writes pages back to it
(:mod:`zramd.device.backed`). It is formatted afresh, unless the export's snapshot (``persist``)
references pages written back to it: then it is opened with those pages' locators live
(:meth:`~zramd.backing.BackingStore.open`, every other segment given back) for the restore to
reference them, after a check that it is the store the snapshot names (its UUID). A snapshot
that cannot be read, or that names another store or records the store cannot open, is refused
by ``add`` with a ConfigError naming the export, the snapshot and the backing path; with
``discard_snapshot`` (``serve --discard-snapshot``) the store is formatted instead and the
restore then sets the snapshot aside. A path that cannot be used (busy: another export or
process holds it, too small, holding something else) is refused by ``add`` with a ConfigError
naming the export and the path, and the registry is unchanged.

Mutations (``add`` / ``remove``) happen on the event-loop thread; the control socket uses them.
``remove`` refuses while clients are attached unless ``force``, which closes their sessions (after
their running requests) and closes the device once no request is running on it.
An export with ``persist`` holds its snapshot file's lock (:class:`~zramd.persist.SnapshotLock`,
``PATH.lock`` beside it) from ``add`` until it is closed, after its last snapshot: a second export
or daemon naming the file is refused by ``add`` with a ConfigError naming the file and the
holder's pid. :meth:`ExportRegistry.renew` replaces an export by an empty one of the same
configuration, in the same place, keeping the lock (a start with ``--discard-snapshot``).
When, how and with what result they were saved (:class:`SnapshotStatus`) and the snapshots
themselves are :mod:`zramd.server.persistence`'s.
This module knows nothing of sockets or bytes on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

from zramd.backing import BackingOpenError, BackingStore, FormatError
from zramd.backing.format import HEADER_BYTES, decode_header
from zramd.config import ConfigError, ExportConfig, format_size
from zramd.device.blockdev import SERVER_OFFLOAD_MIN_PAGES, ZramDevice
from zramd.device.interface import BlockDevice
from zramd.device.table import BACKED, ENTRY_BYTES
from zramd.device.tiers import TierPolicy
from zramd.geometry import PAGE_SIZE
from zramd.persist import SnapshotBusy, SnapshotError, SnapshotLock, SnapshotReader
from zramd.protocol.events import ExportInfo
from zramd.server.durable import Journal
from zramd.stats import IoStats

log = logging.getLogger("zramd.server")


class Attached(Protocol):
    """What the registry needs from a session attached to an export."""

    #: ``#ID PEER``, for log lines
    label: str

    def close(self, reason: str) -> None: ...

    async def wait_idle(self) -> None: ...


async def _close_when_idle(exp: Export, sessions: list[Attached]) -> None:
    try:
        await asyncio.gather(*(s.wait_idle() for s in sessions))
    finally:
        exp.close()


def _client_activity(io: IoStats) -> Callable[[], bool]:
    """Whether the export's clients had requests running or finished since the last call."""
    last = [-1]

    def busy() -> bool:
        total = sum(io.ns)
        seen, last[0] = last[0], total
        return io.in_flight > 0 or total != seen

    return busy


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ExportBusy(Exception):
    """remove() without force while clients are connected."""


def _group_settings(cfg: ExportConfig) -> dict[str, Any]:
    """The device's multi-page group settings the configuration gives (else its defaults)."""
    out: dict[str, Any] = {}
    if cfg.group_pages:
        out["group_pages"] = cfg.group_pages
    if cfg.group_algorithm:
        out["group_algorithm"] = cfg.group_algorithm
        out["group_level"] = cfg.group_level
    return out


def make_device(
    cfg: ExportConfig,
    executor: Executor | None = None,
    budget: Any = None,
    backing: BackingStore | None = None,
) -> BlockDevice:
    """The compressed device for ``cfg``; ``budget`` is the server-wide
    :class:`~zramd.allocator.MemoryBudget` (or None), ``backing`` the store its pages are
    written back to (or None). Raises ConfigError when the page table cannot be reserved."""
    try:
        return ZramDevice(
            cfg.size,
            algorithm=cfg.algorithm,
            level=cfg.level,
            mem_limit=cfg.mem_limit,
            budget=budget,
            executor=executor,
            offload_min_pages=SERVER_OFFLOAD_MIN_PAGES,  # see docs/performance.md
            recompression=cfg.recompression,
            backing=backing,
            writeback_high=cfg.writeback_high,
            writeback_low=cfg.writeback_low,
            writeback_wait=cfg.writeback_wait,
            **_group_settings(cfg),
        )
    except (OSError, MemoryError) as e:
        table = cfg.size // PAGE_SIZE * ENTRY_BYTES
        why = e.strerror if isinstance(e, OSError) and e.strerror else "out of memory"
        raise ConfigError(
            f"export {cfg.name!r} ({format_size(cfg.size)}): cannot reserve its page table "
            f"of {table} bytes: {why}"
        ) from None


def open_backing(cfg: ExportConfig, discard: bool = False) -> BackingStore | None:
    """The backing store of ``cfg``, or None without one: opened with the locators its snapshot
    references live, else formatted empty (see the module doc). Raises ConfigError naming the
    export and the paths."""
    if cfg.backing is None:
        return None
    try:
        refs = _snapshot_references(cfg, discard)
        if refs is not None:
            store = _reopen(cfg, *refs, discard)
            if store is not None:
                return store
        return BackingStore.create(cfg.backing)
    except BackingOpenError as e:
        raise ConfigError(f"export {cfg.name!r}: backing {e}") from None


def _snapshot_references(cfg: ExportConfig, discard: bool) -> tuple[bytes, list[int]] | None:
    """The backing store's UUID and the locators ``cfg``'s snapshot references, or None (no
    snapshot, none written back, or a bad snapshot that ``discard`` will set aside)."""
    if cfg.persist is None:
        return None
    try:
        reader = SnapshotReader(cfg.persist)
    except FileNotFoundError:
        return None
    except SnapshotError as e:
        if discard:
            return None
        raise ConfigError(f"export {cfg.name!r}: {e}") from None
    except OSError as e:
        raise ConfigError(f"export {cfg.name!r}: snapshot {cfg.persist}: {e.strerror}") from None
    try:
        state, handle = reader.meta.table[0], reader.meta.table[1]
        locs = handle[state == BACKED].tolist()
        return (reader.meta.backing, locs) if locs else None
    finally:
        reader.close()


def _reopen(cfg: ExportConfig, uuid: bytes, locs: list[int], discard: bool) -> BackingStore | None:
    """``cfg``'s backing store opened with ``locs`` live, when it is the store ``uuid``; None
    (format it) when it is not or cannot be opened so and ``discard``. Raises ConfigError,
    BackingOpenError."""
    assert cfg.backing is not None and cfg.persist is not None
    why = ""
    try:
        with open(cfg.backing, "rb") as f:
            header = decode_header(f.read(HEADER_BYTES))
    except FileNotFoundError:
        why = "it does not exist"
    except FormatError as e:
        why = str(e)
    except OSError as e:
        raise BackingOpenError(f"{cfg.backing}: {e.strerror}") from None
    else:
        if header.uuid != uuid:
            why = f"it is the backing store {header.uuid_text}, not the snapshot's"
    if not why:
        try:
            return BackingStore.open(cfg.backing, live=locs)
        except BackingOpenError as e:
            why = str(e)
    if discard:
        return None
    raise ConfigError(
        f"export {cfg.name!r}: snapshot {cfg.persist}: its {len(locs)} pages written back cannot "
        f"be read from backing {cfg.backing}: {why}"
    )


def lock_snapshot(cfg: ExportConfig) -> SnapshotLock | None:
    """The lock of ``cfg``'s snapshot file, or None without one. Raises ConfigError naming the
    export and the file when another export or daemon holds it."""
    if cfg.persist is None:
        return None
    try:
        return SnapshotLock(cfg.persist)
    except SnapshotBusy as e:
        raise ConfigError(f"export {cfg.name!r}: {e}") from None
    except OSError as e:
        raise ConfigError(
            f"export {cfg.name!r}: snapshot {cfg.persist}: cannot lock it: {e.strerror}"
        ) from None


@dataclass
class SnapshotStatus:
    """The snapshot file of an export with ``persist``, as this process knows it: when the
    snapshot now on disk was taken (``created``, wall-clock seconds; 0: none yet) and its bytes,
    and of the last save: its seconds, its error ("" when it worked), and the saves and failures
    so far."""

    path: str
    created: float = 0.0
    file_bytes: int = 0
    last_seconds: float = 0.0
    last_error: str = ""
    saves: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The status for ``stat`` and ``list --json``: ``age_seconds`` is -1 with no snapshot."""
        return {
            "path": self.path,
            "age_seconds": round(time.time() - self.created, 3) if self.created else -1,
            "file_bytes": self.file_bytes,
            "last_save_seconds": round(self.last_seconds, 3),
            "last_error": self.last_error,
            "saves": self.saves,
            "failures": self.failures,
        }


class Export:
    """One served export: its configuration, its device, and the sessions using it."""

    __slots__ = (
        "config",
        "device",
        "info",
        "sessions",
        "io",
        "policy",
        "backing",
        "lock",
        "snapshot",
        "journal",
    )

    def __init__(
        self,
        config: ExportConfig,
        device: BlockDevice,
        backing: BackingStore | None = None,
        lock: SnapshotLock | None = None,
    ) -> None:
        self.config = config
        self.device = device
        #: the backing store below RAM (``config.backing``), closed with the device
        self.backing = backing
        #: the lock of the snapshot file (``config.persist``), released by close
        self.lock = lock
        #: what is known of the snapshot file (None without ``persist``)
        self.snapshot = SnapshotStatus(config.persist) if config.persist is not None else None
        #: the journal of an export in durable mode (``sync=flush``), opened by its restore
        #: (:mod:`zramd.server.persistence`) before any client, closed with the device
        self.journal: Journal | None = None
        self.info = ExportInfo(
            name=config.name,
            size=device.size,
            read_only=config.read_only,
            description=config.description,
        )
        self.sessions: set[Attached] = set()
        #: request counters of every connection to this export (a re-created export starts
        #: from zero, as a re-created block device does)
        self.io = IoStats()
        #: the background recompression task, when the configuration asks for one
        self.policy: TierPolicy | None = None
        self.set_policy(config)
        if _loop_running():
            device.start_clock()

    def set_policy(self, config: ExportConfig) -> None:
        """(Re)make the background policy ``config`` asks for (none without
        ``recompress_after``); a running one is cancelled, the new one runs when a loop does."""
        if self.policy is not None:
            self.policy.cancel()
            self.policy = None
        if config.recompress_after:
            self.policy = TierPolicy(
                config.name,
                self.device,
                after=config.recompress_after,
                interval=config.recompress_interval,
                kind=config.recompress_type,
                group_pages=config.group_pages,
                busy=_client_activity(self.io),
            )
            if _loop_running():
                self.policy.start()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def clients(self) -> int:
        return len(self.sessions)

    def close(self) -> None:
        """Close the device, then the journal (synced), the backing store, then release the
        snapshot's lock."""
        try:
            self.device.close()
            if self.journal is not None:
                self.journal.close()
        finally:
            try:
                if self.backing is not None:
                    self.backing.close()
            finally:
                if self.lock is not None:
                    self.lock.release()

    def __repr__(self) -> str:
        return f"<Export {self.config.summary()} clients={self.clients}>"


class ExportRegistry:
    """Named exports; an :class:`~zramd.protocol.events.ExportCatalog`."""

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        default: str | None = None,
        budget: Any = None,
        discard_snapshot: bool = False,
    ) -> None:
        self._exports: dict[str, Export] = {}
        #: exports clients cannot see yet (:meth:`hide`)
        self._hidden: set[str] = set()
        self._executor = executor
        self._pending: set[asyncio.Task[None]] = set()
        #: server-wide MemoryBudget shared by every export's pool (None: no global limit)
        self.budget = budget
        self.default = default
        #: a snapshot its export cannot use is set aside at start (``serve --discard-snapshot``)
        self.discard_snapshot = discard_snapshot

    # --- ExportCatalog --------------------------------------------------------------------------
    def lookup(self, name: str) -> ExportInfo | None:
        exp = self.get(name)
        return exp.info if exp is not None and exp.name not in self._hidden else None

    def list_exports(self) -> list[ExportInfo]:
        return [e.info for e in self._exports.values() if e.name not in self._hidden]

    def hide(self, name: str) -> None:
        """Keep export ``name`` from clients (lookup, list) until :meth:`show`: an export being
        restored on a running daemon."""
        self._hidden.add(name)

    def show(self, name: str) -> None:
        self._hidden.discard(name)

    # --- management -----------------------------------------------------------------------------
    def get(self, name: str) -> Export | None:
        """The export called ``name``; ``""`` is the default export."""
        if name == "":
            if self.default is not None and self.default in self._exports:
                return self._exports[self.default]
            return next(iter(self._exports.values()), None)
        return self._exports.get(name)

    def add(self, config: ExportConfig, device: BlockDevice | None = None) -> Export:
        """Create a new export on a compressed device, or on ``device`` when given (tests put
        their own devices behind an export this way). Raises ConfigError on a duplicate."""
        config.validate()
        if config.name in self._exports:
            raise ConfigError(f"export {config.name!r} already exists")
        exp = self._make(config, device, lock_snapshot(config))
        self._exports[config.name] = exp
        return exp

    def _make(
        self, config: ExportConfig, device: BlockDevice | None, lock: SnapshotLock | None
    ) -> Export:
        """The export of ``config`` holding ``lock`` (released when this fails)."""
        backing: BackingStore | None = None
        try:
            backing = open_backing(config, self.discard_snapshot)
            if device is None:
                device = make_device(config, self._executor, self.budget, backing)
        except BaseException:
            if backing is not None:
                backing.close()
            if lock is not None:
                lock.release()
            raise
        return Export(config, device, backing, lock)

    def renew(self, name: str) -> Export:
        """Replace export ``name`` (no client attached yet) by an empty one of the same
        configuration, in its place: its device and backing store are closed and made anew,
        its snapshot's lock stays held. Raises KeyError, ConfigError."""
        old = self._exports[name]
        assert not old.sessions, "renew an export in use"
        lock, old.lock = old.lock, None
        if old.policy is not None:
            old.policy.cancel()
        try:
            old.close()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        exp = self._make(old.config, None, lock)
        self._exports[name] = exp
        return exp

    def start(self) -> None:
        """Start the background tasks (policy, access clock) of the exports added before the
        loop ran."""
        for exp in self._exports.values():
            exp.device.start_clock()
            if exp.policy is not None:
                exp.policy.start()

    def remove(self, name: str, force: bool = False) -> Export:
        """Remove and close an export. Refuses (ExportBusy) while clients are attached, unless
        ``force``: then their sessions are closed first. Raises KeyError if unknown."""
        exp, busy = self.detach(name, force)
        if busy:
            # requests still running on the device: close it once they are done
            task = asyncio.get_running_loop().create_task(_close_when_idle(exp, busy))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            exp.close()
        return exp

    def detach(self, name: str, force: bool = False) -> tuple[Export, list[Attached]]:
        """Take an export out of the registry without closing its device (the caller does,
        once the returned sessions, which still have requests running, are idle): as
        :meth:`remove`, its sessions are closed and its policy cancelled."""
        exp = self._exports.get(name)
        if exp is None:
            raise KeyError(name)
        if exp.sessions and not force:
            raise ExportBusy(f"export {name!r} has {exp.clients} client(s) connected")
        busy = [s for s in exp.sessions if getattr(s, "in_flight", 0)]
        for s in list(exp.sessions):
            s.close(f"export {name!r} removed")
        exp.sessions.clear()
        del self._exports[name]
        if exp.policy is not None:
            exp.policy.cancel()
        if self.default == name:
            self.default = None
        return exp, busy

    def close(self) -> None:
        """Close every device (server exit)."""
        for exp in self._exports.values():
            if exp.policy is not None:
                exp.policy.cancel()
            try:
                exp.close()
            except Exception:  # noqa: BLE001 - closing must go on for the others
                log.exception("closing export %s", exp.name)
        self._exports.clear()

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    def __contains__(self, name: object) -> bool:
        return name in self._exports
