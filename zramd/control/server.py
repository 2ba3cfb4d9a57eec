"""The daemon side of the control socket: an asyncio Unix server acting on the registry.

Theory of operation
-------------------
:class:`ControlServer` listens on a Unix socket (default ``/run/zramd/control.sock``,
mode 0600) and answers JSON-line requests (see ``protocol``) by calling the export
registry's public API (``add``, ``remove``, ``get``, iteration, its memory ``budget``) and the
management part
of the device contract (:class:`~zramd.device.interface.BlockDevice`: ``stats``,
``compact``, ``reset``, ``set_mem_limit``, ``algorithm``, ``set_algorithm``, ``mark_idle``,
``page_states``, ``recompress``, ``group``, ``writeback``, ``set_writeback_limit``,
``backing_stat``); a device without an operation raises
``Unsupported``, which becomes the error line. All of it runs on the event-loop thread, as
the registry requires; the long ones (``idle``, ``pages``, ``recompress``, ``writeback``) work
on a bounded range per request (the CLI asks again from the ``next`` page, with a progress bar),
and ``idle``, ``recompress`` and ``writeback`` yield to client requests between their slices.

Views of an export (``list`` rows, ``stat``, and through ``stat`` the metrics): zramctl's columns
and zram's mm_stat / io_stat from the device, the block layer's stat and per-command counters
from the export's :class:`~zramd.stats.IoStats` (``invalid_io`` comes from there: the device
never sees a request with a bad range), and the memory limit in force: the export's own, or what
the server-wide budget leaves it when that is lower (``limited_by`` says which); for an export
with a persist file, its snapshot's status (``persist``: age, bytes, the last save's seconds and
error, saves and failures; None without one).

Invariants:
- Only one daemon owns a control socket: :meth:`ControlServer.start` connects to an
  existing path first and refuses (:class:`ControlSocketBusy`) if something answers;
  a stale socket file is replaced. On close the file is removed only if it is still
  ours (same inode).
- Peers must be root or our own uid (SO_PEERCRED), on top of the 0600 mode.
- Lines are bounded (``MAX_LINE``), connections are bounded
  (``MAX_CONTROL_CONNECTIONS``); every failure becomes one ``{"ok": false}`` line.
- ``destroy`` and ``reset`` are refused while clients are connected (``destroy``
  unless ``force``), like the kernel refusing to reset an open zram device. ``destroy`` of
  an export with a persist file writes its snapshot first; ``snapshot`` writes one while
  clients go on (:mod:`zramd.server.persistence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat as stat_mod
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from zramd.config import (
    ConfigError,
    ExportConfig,
    check_mem_limit,
    parse_compression,
    parse_duration,
    parse_fraction,
    parse_size,
)
from zramd.control.client import socket_is_live
from zramd.control.protocol import (
    CONTROL_SOCKET_MODE,
    MAX_CONTROL_CONNECTIONS,
    MAX_LINE,
    ControlError,
    decode,
    encode,
)
from zramd.device.backed import check_writeback
from zramd.device.interface import BlockDevice, DeviceError, Unsupported
from zramd.geometry import PAGE_SIZE
from zramd.server import persistence
from zramd.stats import BACKING_FIELDS, IO_STAT_FIELDS, MM_STAT_FIELDS, TIER_FIELDS, IoStats

log = logging.getLogger("zramd.control")

_UCRED = struct.Struct("3i")


class ControlSocketBusy(ControlError):
    """Another daemon answers on the control socket."""


class ExportLike(Protocol):
    config: ExportConfig
    device: BlockDevice
    io: IoStats

    @property
    def name(self) -> str: ...

    @property
    def clients(self) -> int: ...


class RegistryLike(Protocol):
    #: the server-wide :class:`~zramd.allocator.MemoryBudget`, or None
    budget: Any

    def get(self, name: str) -> Any: ...

    def add(self, config: ExportConfig) -> Any: ...

    def remove(self, name: str, force: bool = False) -> Any: ...

    def hide(self, name: str) -> None: ...

    def show(self, name: str) -> None: ...

    def detach(self, name: str, force: bool = False) -> tuple[Any, list[Any]]: ...

    def __iter__(self) -> Any: ...


ReloadHook = Callable[[], Awaitable[list[str]]]

#: pages ``idle`` marks per slice (one vectorised pass; the loop runs clients in between)
IDLE_SLICE_PAGES = 1 << 16
#: most pages one ``pages`` request lists (the answer stays well under MAX_LINE)
PAGES_PER_REQUEST = 4096
#: pages one ``recompress`` request scans (128 MiB: a second or two of codec work at most, so
#: the progress bar moves); the CLI asks again from ``next``
RECOMPRESS_SCAN_PAGES = 1 << 15


# --- views of an export ---------------------------------------------------------------------


def _stats_dict(exp: ExportLike) -> dict[str, int]:
    d = exp.device.stats.as_dict()
    d["invalid_io"] = exp.io.invalid_io
    return {f: d[f] for f in (*MM_STAT_FIELDS, *IO_STAT_FIELDS, *TIER_FIELDS, *BACKING_FIELDS)}


def _algorithm(exp: ExportLike) -> str:
    return exp.device.algorithm or exp.config.algorithm


def effective_mem_limit(own: int, held: int, budget: Any) -> tuple[int, str]:
    """The memory limit in force for an export holding ``held`` bytes with its own limit
    ``own`` (0: none) under ``budget`` (a MemoryBudget or None), and what sets it: "export",
    "budget" (the budget leaves it less than its own limit, or it has none), "" (no limit)."""
    if budget is not None and budget.limit:
        room = held + max(0, budget.limit - budget.used)
        if not own or room < own:
            return room, "budget"
    return own, "export" if own else ""


def export_row(exp: ExportLike, budget: Any) -> dict[str, Any]:
    """One line of ``list``: zramctl's columns, in bytes and pages; ``mem_limit`` is the limit
    in force (:func:`effective_mem_limit`), ``limited_by`` what sets it."""
    s = _stats_dict(exp)
    data = s["orig_data_size"]
    total = s["mem_used_total"]
    limit, by = effective_mem_limit(s["mem_limit"], total, budget)
    io = exp.io
    return {
        "name": exp.name,
        "disksize": int(exp.device.size),
        "data": data,
        "compr": s["compr_data_size"],
        "algorithm": _algorithm(exp),
        "zero_pages": s["same_pages"],
        "total": total,
        "mem_limit": limit,
        "mem_used": s["mem_used_max"],
        "comp_ratio": round(data / total, 2) if total else 0.0,
        "clients": exp.clients,
        "read_only": bool(exp.config.read_only),
        "description": exp.config.description,
        "limited_by": by,
        "stat": io.block_stat(),
        **{f: s[f] for f in TIER_FIELDS},
        **{f: s[f] for f in BACKING_FIELDS},
        **_writeback_settings(exp),
        "persist": _persist(exp),
        "journal": _journal(exp),
    }


def _persist(exp: ExportLike) -> dict[str, Any] | None:
    """The export's snapshot status (:class:`~zramd.server.exports.SnapshotStatus`) with its
    ``sync`` mode, or None without a persist file."""
    status = getattr(exp, "snapshot", None)
    if status is None:
        return None
    return {**status.as_dict(), "sync": exp.config.sync}


def _journal(exp: ExportLike) -> dict[str, Any] | None:
    """The journal's figures of an export in durable mode
    (:meth:`~zramd.server.durable.Journal.as_dict`), else None."""
    journal = getattr(exp, "journal", None)
    return journal.as_dict() if journal is not None else None


def export_stat(exp: ExportLike, budget: Any) -> dict[str, Any]:
    s = _stats_dict(exp)
    io = exp.io
    limit, by = effective_mem_limit(s["mem_limit"], s["mem_used_total"], budget)
    memory: dict[str, Any] = {
        "mem_limit": s["mem_limit"],
        "effective_mem_limit": limit,
        "limited_by": by,
        "budget_limit": budget.limit if budget is not None else 0,
        "budget_used": budget.used if budget is not None else 0,
        "enospc": dict(io.nospace),
    }
    return {
        "name": exp.name,
        "disksize": int(exp.device.size),
        "algorithm": _algorithm(exp),
        "clients": exp.clients,
        "mm_stat": {f: s[f] for f in MM_STAT_FIELDS},
        "io_stat": {f: s[f] for f in IO_STAT_FIELDS},
        "stat": io.block_stat(),
        "requests": io.commands(),
        "memory": memory,
        "tiers": _tiers(exp, s),
        "backing": _backing(exp, s),
        "persist": _persist(exp),
        "journal": _journal(exp),
    }


def _tiers(exp: ExportLike, s: dict[str, int]) -> dict[str, Any]:
    """The tier counters, the recompression algorithms and the background policy's state."""
    policy = getattr(exp, "policy", None)
    return {
        **{f: s[f] for f in TIER_FIELDS},
        "recompression_algorithms": exp.device.recompression_algorithms,
        "policy": policy.as_dict() if policy is not None else None,
    }


def _backing(exp: ExportLike, s: dict[str, int]) -> dict[str, Any]:
    """The writeback counters (pages), the writeback limit left (-1: none), the pressure
    writeback's settings (:func:`_writeback_settings`) and the backing store's own counters
    (``store``: {} without a backing store)."""
    limit = exp.device.writeback_limit
    return {
        **{f: s[f] for f in BACKING_FIELDS},
        "writeback_limit": -1 if limit is None else limit,
        **_writeback_settings(exp),
        "store": exp.device.backing_stat(),
    }


def _writeback_settings(exp: ExportLike) -> dict[str, float | None]:
    """``writeback_high`` and ``writeback_low`` (fractions of the memory limit in force) and
    ``writeback_wait`` (seconds) of the export's pressure writeback; None without a backing
    store."""
    settings = exp.device.writeback_settings
    return {f"writeback_{k}": settings.get(k) for k in ("high", "low", "wait")}


# --- argument helpers -----------------------------------------------------------------------


def _arg_str(req: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    v = req.get(key)
    if v is None:
        if required:
            raise ControlError(f"missing argument {key!r}")
        return None
    if not isinstance(v, str):
        raise ControlError(f"argument {key!r} must be a string")
    return v


def _arg_size(req: dict[str, Any], key: str) -> int | None:
    v = req.get(key)
    if v is None:
        return None
    try:
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ConfigError(f"bad {key} {v!r}")
        return parse_size(v, what=key.replace("_", "-"))
    except ConfigError as e:
        raise ControlError(str(e)) from None


def _arg_duration(req: dict[str, Any], key: str) -> float | None:
    v = req.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float | str):
        raise ControlError(f"argument {key!r} must be a duration")
    try:
        return parse_duration(v, what=key)
    except ConfigError as e:
        raise ControlError(str(e)) from None


def _arg_int(req: dict[str, Any], key: str) -> int | None:
    v = req.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ControlError(f"argument {key!r} must be an integer")
    return v


class ControlServer:
    """Serve the control protocol for ``registry`` on the Unix socket ``path``."""

    def __init__(
        self,
        registry: RegistryLike,
        path: str,
        *,
        mode: int = CONTROL_SOCKET_MODE,
        reload: ReloadHook | None = None,
    ) -> None:
        self.registry = registry
        self.path = path
        self.mode = mode
        self.reload_hook = reload
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self._ping,
            "create": self._create,
            "destroy": self._destroy,
            "reset": self._reset,
            "compact": self._compact,
            "set": self._set,
            "list": self._list,
            "stat": self._stat,
            "idle": self._idle,
            "pages": self._pages,
            "recompress": self._recompress,
            "writeback": self._writeback,
            "snapshot": self._snapshot,
        }

    # --- lifecycle ------------------------------------------------------------------------------

    def _prepare_path(self) -> None:
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat_mod.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {self.path} exists and is not a socket")
        if socket_is_live(self.path):
            raise ControlSocketBusy(
                f"another zramd is already running on control socket {self.path}"
            )
        log.info("removing stale control socket %s", self.path)
        os.unlink(self.path)

    async def start(self) -> None:
        """Bind and listen. Raises ControlSocketBusy if another daemon answers there."""
        self._prepare_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            if socket_is_live(self.path):
                raise ControlSocketBusy(
                    f"another zramd is already running on control socket {self.path}"
                ) from None
            why = e.strerror or str(e)  # "AF_UNIX path too long" has no errno
            raise ControlError(f"cannot bind control socket {self.path}: {why}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(
            self._on_connect, sock=sock, limit=MAX_LINE
        )
        log.info("control socket on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            self._inode = None

    # --- connections ----------------------------------------------------------------------------

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return True
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return True
        _pid, uid, _gid = _UCRED.unpack(raw)
        return uid in (0, os.geteuid())

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_CONTROL_CONNECTIONS:
            await self._reply_close(writer, {"ok": False, "error": "too many control connections"})
            return
        if not self._peer_allowed(writer):
            await self._reply_close(writer, {"ok": False, "error": "permission denied"})
            return
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply_close(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            writer.write(encode(obj))
            await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                writer.write(encode({"ok": False, "error": f"request longer than {MAX_LINE}"}))
                await writer.drain()
                return
            except ConnectionError:
                return
            if not line:
                return
            if not line.strip():
                continue
            answer = await self.handle_line(line)
            writer.write(encode(answer))
            await writer.drain()

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            req = decode(line)
            return {"ok": True, "result": await self.handle(req)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the daemon
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    async def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "reload":
            if self.reload_hook is None:
                raise ControlError("this daemon has no configuration file to reload")
            return await self.reload_hook()
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join([*self._handlers, "reload"])
            raise ControlError(f"unknown operation {op!r} (known: {known})")
        result = handler(req)
        if inspect.isawaitable(result):
            result = await result
        return result

    # --- operations -----------------------------------------------------------------------------

    def _export(self, req: dict[str, Any]) -> Any:
        name = _arg_str(req, "name")
        assert name is not None
        exp = self.registry.get(name) if name else None
        if exp is None:
            raise ControlError(f"no export named {name!r}")
        return exp

    def _ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def _create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _arg_str(req, "name")
        assert name is not None
        size = _arg_size(req, "size")
        if size is None:
            raise ControlError("missing argument 'size'")
        cfg = ExportConfig(name=name, size=size)
        alg = _arg_str(req, "algorithm", required=False)
        if alg is not None:
            cfg.algorithm = alg.lower()
        cfg.level = _arg_int(req, "level")
        cfg.mem_limit = _arg_size(req, "mem_limit") or 0
        cfg.read_only = bool(req.get("read_only", False))
        cfg.description = _arg_str(req, "description", required=False) or ""
        cfg.backing = _arg_str(req, "backing", required=False)
        cfg.persist = _arg_str(req, "persist", required=False)
        cfg.sync = _arg_str(req, "sync", required=False) or "stop"
        try:
            cfg.validate()
        except ConfigError as e:
            raise ControlError(str(e)) from None
        exp = self.registry.add(cfg)
        if cfg.persist is not None:
            # restored (snapshot, then journal) while clients cannot see it
            self.registry.hide(cfg.name)
            try:
                await persistence.restore_one(exp)
            except ConfigError as e:
                self.registry.remove(cfg.name, force=True)
                raise ControlError(str(e)) from None
            finally:
                self.registry.show(cfg.name)
        log.info("created export %s", cfg.summary())
        return self._row(exp)

    async def _destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        force = bool(req.get("force", False))
        if exp.clients and not force:
            raise ControlError(
                f"export {exp.name!r} has {exp.clients} client(s) connected; "
                "disconnect them or use --force"
            )
        name = exp.name
        if exp.config.persist is not None:
            await persistence.destroy(self.registry, name, force)
        else:
            self.registry.remove(name, force=force)
        log.info("destroyed export %s%s", name, " (forced)" if force else "")
        return {"name": name}

    async def _snapshot(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        path = _arg_str(req, "path", required=False)
        if path is not None and not os.path.isabs(path):
            raise ControlError(f"snapshot path {path!r} must be an absolute path")
        try:
            info = await persistence.save(exp, path)
        except OSError as e:
            raise ControlError(f"snapshot {path or exp.config.persist}: {e}") from None
        except DeviceError as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        return {"name": exp.name, **info.as_dict()}

    async def _reset(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        if exp.clients:
            raise ControlError(
                f"export {exp.name!r} has {exp.clients} client(s) connected; "
                "cannot reset a device in use"
            )
        # the background policy may be inside a device call: stop it, reset, start it again
        policy = getattr(exp, "policy", None)
        if policy is not None:
            await policy.stop()
        try:
            exp.device.reset()
        except Unsupported as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        else:
            journal = getattr(exp, "journal", None)
            if journal is not None:
                journal.reset()
                await journal.sync()
        finally:
            if policy is not None:
                policy.start()
        log.info("reset export %s", exp.name)
        return self._row(exp)

    def _compact(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        name = _arg_str(req, "name", required=False)
        targets: Iterable[Any] = [self._export(req)] if name else list(self.registry)
        out = []
        for exp in targets:
            freed = exp.device.compact()
            out.append({"name": exp.name, "pages_compacted": freed})
        return out

    def _set(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        mem_limit = _arg_size(req, "mem_limit")
        alg = _arg_str(req, "algorithm", required=False)
        level = _arg_int(req, "level")
        wb_limit = req.get("writeback_limit")
        pressure = {k: req[k] for k in ("writeback_high", "writeback_low", "writeback_wait")
                    if req.get(k) is not None}  # fmt: skip
        if mem_limit is None and alg is None and level is None and wb_limit is None and not (
            pressure
        ):
            raise ControlError(
                "nothing to set (give mem-limit, algorithm, level, writeback-limit, "
                "writeback-high, writeback-low or writeback-wait)"
            )
        dev = exp.device
        if pressure:
            cfg = exp.config
            try:
                high = parse_fraction(pressure.get("writeback_high", cfg.writeback_high),
                                      what="writeback-high")  # fmt: skip
                low = parse_fraction(pressure.get("writeback_low", cfg.writeback_low),
                                     what="writeback-low")  # fmt: skip
                wait = parse_duration(pressure.get("writeback_wait", cfg.writeback_wait),
                                      what="writeback-wait")  # fmt: skip
                if cfg.backing is None:
                    raise ConfigError("it has no backing store")
                check_writeback(high, low, wait)
                dev.set_writeback_settings(high, low, wait)
            except (ConfigError, Unsupported, ValueError) as e:
                raise ControlError(f"export {exp.name!r}: {e}") from None
            cfg.writeback_high, cfg.writeback_low, cfg.writeback_wait = high, low, wait
            log.info(
                "set export %s: pressure writeback from %g to %g, writes wait %gs",
                exp.name, high, low, wait,
            )  # fmt: skip
        if wb_limit is not None:
            nbytes = None if wb_limit == "none" else _arg_size(req, "writeback_limit")
            try:
                dev.set_writeback_limit(nbytes)
            except (Unsupported, ValueError) as e:
                raise ControlError(f"export {exp.name!r}: {e}") from None
            log.info("set export %s: writeback-limit %s", exp.name, wb_limit)
        if alg is not None or level is not None:
            new_alg = (alg or exp.config.algorithm).lower()
            try:
                dev.set_algorithm(new_alg, level=level)
            except (Unsupported, ValueError) as e:
                raise ControlError(f"export {exp.name!r}: {e}") from None
            exp.config.algorithm = new_alg
            exp.config.level = level
        if mem_limit is not None:
            check_mem_limit(exp.name, int(dev.size), mem_limit)
            try:
                dev.set_mem_limit(mem_limit)
            except (Unsupported, ValueError) as e:
                raise ControlError(f"export {exp.name!r}: {e}") from None
            exp.config.mem_limit = mem_limit
        log.info("set export %s: %s", exp.name, exp.config.summary())
        return self._row(exp)

    def _row(self, exp: Any) -> dict[str, Any]:
        return export_row(exp, self.registry.budget)

    def _list(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._row(e) for e in self.registry]

    def _stat(self, req: dict[str, Any]) -> dict[str, Any]:
        return export_stat(self._export(req), self.registry.budget)

    # --- cold pages: idle, pages, recompress ------------------------------------------------------

    def _page_range(self, exp: Any, req: dict[str, Any]) -> tuple[int, int]:
        npages = int(exp.device.size) // PAGE_SIZE
        first = _arg_int(req, "first") or 0
        stop = _arg_int(req, "stop")
        stop = npages if stop is None else stop
        if not 0 <= first <= stop <= npages:
            raise ControlError(
                f"export {exp.name!r}: page range {first}-{stop - 1} is outside its pages "
                f"0-{npages - 1}"
            )
        return first, stop

    async def _idle(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        age = _arg_duration(req, "age")
        if age is None and not req.get("all"):
            raise ControlError("give all or an age")
        first, stop = self._page_range(exp, req)
        marked = 0
        try:
            for pos in range(first, stop, IDLE_SLICE_PAGES):
                marked += exp.device.mark_idle(age, pos, min(stop, pos + IDLE_SLICE_PAGES))
                await asyncio.sleep(0)
        except Unsupported as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        return {"name": exp.name, "marked": marked, "idle_pages": exp.device.stats.idle_pages}

    def _pages(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        first, stop = self._page_range(exp, req)
        limit = min(_arg_int(req, "limit") or PAGES_PER_REQUEST, PAGES_PER_REQUEST)
        if limit < 1:
            raise ControlError("limit must be at least 1")
        try:
            rows, nxt = exp.device.page_states(first, stop, limit)
        except Unsupported as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        return {"pages": [vars(r) for r in rows], "next": nxt, "stop": stop}

    async def _recompress(self, req: dict[str, Any]) -> dict[str, Any]:
        exp = self._export(req)
        first, stop = self._page_range(exp, req)
        kind = (_arg_str(req, "type", required=False) or "all").replace("_", "-")
        threshold = _arg_int(req, "threshold") or 0
        max_pages = _arg_int(req, "max_pages")
        group_pages = _arg_int(req, "group_pages") or 1
        algorithm, level = "", None
        text = _arg_str(req, "algorithm", required=False)
        if text:
            comp = parse_compression(text)
            if comp.recompression or comp.recompress_type is not None:
                raise ControlError(f"{text!r}: one algorithm expected")
            algorithm, level = comp.algorithm, comp.level
        if max_pages is not None and max_pages < 0:
            raise ControlError("max-pages must not be negative")
        scan_stop = min(stop, first + RECOMPRESS_SCAN_PAGES)
        try:
            if group_pages > 1:
                return await self._group(exp, first, scan_stop, stop, kind, group_pages,
                                         algorithm, level)
            res = await exp.device.recompress(
                kind=kind,
                threshold=threshold,
                algorithm=algorithm,
                level=level,
                first=first,
                stop=stop,
                max_pages=max_pages,
                max_scan=scan_stop - first,
            )
        except (Unsupported, ValueError) as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        out = vars(res)
        out["stop"] = stop
        return out

    async def _writeback(self, req: dict[str, Any]) -> dict[str, Any]:
        """``writeback``: the pages of the range of one type go to the backing store, a bounded
        scan per request (the CLI asks again from ``next``)."""
        exp = self._export(req)
        first, stop = self._page_range(exp, req)
        kind = (_arg_str(req, "type", required=False) or "idle").replace("_", "-")
        max_pages = _arg_int(req, "max_pages")
        if max_pages is not None and max_pages < 0:
            raise ControlError("max-pages must not be negative")
        try:
            res = await exp.device.writeback(
                kind=kind,
                first=first,
                stop=stop,
                max_pages=max_pages,
                max_scan=min(stop, first + RECOMPRESS_SCAN_PAGES) - first,
            )
        except (Unsupported, ValueError) as e:
            raise ControlError(f"export {exp.name!r}: {e}") from None
        out = vars(res)
        out["stop"] = stop
        return out

    async def _group(
        self,
        exp: Any,
        first: int,
        scan_stop: int,
        stop: int,
        kind: str,
        group_pages: int,
        algorithm: str,
        level: int | None,
    ) -> dict[str, Any]:
        """``recompress --group-pages N``: pack the idle pages of the range into groups."""
        if kind not in ("all", "idle"):
            raise ControlError("--group-pages packs idle pages: give no --type or --type idle")
        if scan_stop <= first:
            return {"next": stop, "end": stop, "stop": stop, "tried": 0, "recompressed": 0,
                    "incompressible": 0, "saved": 0, "nospace": False, "aborted": False,
                    "groups": 0}
        res = await exp.device.group(
            first, scan_stop - 1, group_pages=group_pages, algorithm=algorithm, level=level
        )
        return {
            "next": scan_stop,
            "end": stop,
            "stop": stop,
            "tried": res.pages,
            "recompressed": res.pages,
            "incompressible": 0,
            "saved": res.saved,
            "nospace": res.no_space,
            "aborted": False,
            "groups": res.groups,
        }
