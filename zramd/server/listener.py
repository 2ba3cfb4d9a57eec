"""Listeners and the server object: TCP, Unix socket, systemd socket activation, stdio.

Theory of operation
-------------------
:class:`Server` owns everything one ``zramd serve`` process runs: the codec thread pool, the
:class:`~zramd.server.exports.ExportRegistry` (built from the config), the shared
:class:`~zramd.server.session.ServerContext`, the :class:`~zramd.server.admission.Admission` of
new connections, and the listening sockets. ``start()`` binds and logs exactly one INFO line
(``listening on ... (exports: ...)``); ``serve_forever()`` returns once ``shutdown()`` has
finished (or, in stdio mode, once the single connection has ended).

Listener sources, in order: systemd socket activation (``LISTEN_PID`` == our pid and
``LISTEN_FDS`` = n: fds 3..3+n-1 are listening sockets; when present they replace the default TCP
listener), ``--unix PATH`` (a stale socket file nobody answers on is removed; a live one is an
error; mode 0600 by default), TCP (``--bind``/``--port``, 127.0.0.1:10809 by default). ``--stdio``
serves one connection on fd 0/1 instead (``server/stdio.py``: a socket on stdin is used directly,
otherwise stdin/stdout are driven as a pipe pair); the server stops when it ends.
The Unix socket is created under a umask matching its mode (no window with looser permissions).

Admission: every listener's protocol factory is ``Admission.gate``, so the connection cap
(``--max-connections``), shutdown and the TCP allow-list (``--allow``) are decided for each
accepted connection, stdio's included, before a session exists (``server/admission.py``).

STARTTLS (``--tls on|require``) uses one ``ssl.SSLContext`` built at ``start()`` from
``--tls-certificates`` (``server/tls.py``); a bad certificates directory is a start failure. TLS
works on TCP, Unix, inherited and stdio-socket connections; on stdio pipes ``start_tls`` is
impossible, so ``--tls`` with pipes is a start failure.

Shutdown (SIGTERM/SIGINT or ``shutdown()``): stop accepting; set the shutdown flag so new requests
get ESHUTDOWN and options of sessions still negotiating get ERR_SHUTDOWN; wait (bounded by
:data:`SHUTDOWN_DRAIN_TIMEOUT`) for requests in flight to finish; then give clients up to
:data:`SHUTDOWN_GRACE` to soft-disconnect (the spec's answer to ESHUTDOWN), still answering every
request they send with ESHUTDOWN; close every connection; snapshot the exports that have a
persist file; close the devices; remove our Unix socket file. ``start()`` restores those exports
before it binds anything (:mod:`zramd.server.persistence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import uvloop

from zramd.allocator import MemoryBudget
from zramd.config import ConfigError, ServerConfig
from zramd.protocol.limits import Limits
from zramd.server import persistence, stdio
from zramd.server.access import AllowList
from zramd.server.admission import Admission
from zramd.server.exports import ExportRegistry
from zramd.server.session import ServerContext
from zramd.server.tls import server_context
from zramd.system import sd_notify, tune_malloc

log = logging.getLogger("zramd.server")

#: Codec worker threads (lz4/zstd release the GIL; the machine has few cores).
CODEC_WORKERS = 2
#: Seconds shutdown waits for requests in flight before closing connections anyway.
SHUTDOWN_DRAIN_TIMEOUT = 30.0
#: Seconds shutdown waits for closed connections to be torn down.
SHUTDOWN_CLOSE_TIMEOUT = 5.0
#: After in-flight requests finished: how long clients may keep sending (each request answered
#: ESHUTDOWN) before we close; a conforming client disconnects as soon as it sees ESHUTDOWN.
SHUTDOWN_GRACE = 1.0
#: First inherited fd under systemd socket activation (SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3
#: TCP listen backlog.
LISTEN_BACKLOG = 128
#: File descriptors kept beside the connection cap (listeners, control socket, logs, pipes).
NOFILE_RESERVE = 256


class ServerError(Exception):
    """The server could not start (address in use, bad socket path...)."""


def socket_activation_fds(environ: dict[str, str] | None = None) -> list[int]:
    """File descriptors passed by systemd socket activation (empty if none are for us)."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        n = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or n <= 0:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))


def install_uvloop() -> str:
    """Run on uvloop (libuv; a dependency of every install: about twice the plain asyncio loop's
    throughput for large reads, docs/performance.md); returns its name and version."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {uvloop.__version__}"


class Server:
    """A running zramd server."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: ExportRegistry | None = None,
        structured_replies: bool = True,
    ) -> None:
        if registry is None:
            config.validate()
        self.config = config
        self.executor = ThreadPoolExecutor(CODEC_WORKERS, thread_name_prefix="zramd-codec")
        if registry is None:
            registry = ExportRegistry(
                self.executor,
                default=config.default_export,
                budget=_budget(config),
                discard_snapshot=config.discard_snapshot,
            )
            for e in config.exports:
                registry.add(e)
        self.registry = registry
        self.ctx = ServerContext(
            registry,
            limits=protocol_limits(config),
            max_in_flight=config.max_in_flight,
            max_in_flight_bytes=config.max_in_flight_bytes,
            poll_us=config.poll_us,
            handshake_timeout=config.handshake_timeout,
            structured_replies=structured_replies,
            tls=config.tls,
        )
        self.admission = Admission(
            self.ctx, config.max_connections, AllowList(config.allow) if config.allow else None
        )
        self.addresses: list[str] = []
        self.tcp_port: int | None = None
        self._servers: list[asyncio.AbstractServer | _NullServer] = []
        self._unix_path: str | None = None
        self._unix_ino: tuple[int, int] | None = None
        self._stopped: asyncio.Event | None = None
        self._shutdown_task: asyncio.Task[None] | None = None

    # --- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        await persistence.restore_all(self.registry, self.config.discard_snapshot)
        self.registry.start()
        cfg = self.config
        raise_nofile_limit(cfg.max_connections + NOFILE_RESERVE)
        try:
            if cfg.tls != "off" and self.ctx.ssl_context is None:
                assert cfg.tls_certificates is not None  # validate() checked it
                self.ctx.ssl_context = server_context(
                    cfg.tls_certificates, verify_peer=cfg.tls_verify_peer
                )
            if cfg.stdio:
                await self._start_stdio(loop)
            else:
                fds = socket_activation_fds()
                if fds:
                    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                        os.environ.pop(var, None)
                    for fd in fds:
                        await self._start_inherited(loop, fd)
                else:
                    if cfg.unix:
                        await self._start_unix(loop, cfg.unix)
                    if cfg.port is not None and cfg.bind is not None:
                        await self._start_tcp(loop, cfg.bind, cfg.port)
                if not self._servers:
                    raise ServerError("no listener configured")
        except BaseException:
            await self._close_listeners()
            raise
        exports = ", ".join(e.config.summary() for e in self.registry)
        log.info("listening on %s (exports: %s)", ", ".join(self.addresses), exports)
        try:
            sd_notify("READY=1\nSTATUS=listening on " + ", ".join(self.addresses))
        except Exception:  # noqa: BLE001 - notification is best effort
            log.debug("sd_notify failed", exc_info=True)

    async def _start_tcp(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        try:
            srv = await loop.create_server(
                self.admission.gate, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._servers.append(srv)
        for s in srv.sockets:
            addr = s.getsockname()
            self.tcp_port = addr[1]
            self.addresses.append(
                f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
            )

    async def _start_unix(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        _remove_stale_socket(path)
        try:
            old_umask = os.umask(0o777 & ~self.config.unix_mode)
            try:
                srv = await loop.create_unix_server(
                    self.admission.gate, path, backlog=LISTEN_BACKLOG
                )
            finally:
                os.umask(old_umask)
        except OSError as e:
            raise ServerError(f"cannot listen on unix socket {path}: {e.strerror or e}") from None
        os.chmod(path, self.config.unix_mode)
        st = os.stat(path)
        self._unix_path = path
        self._unix_ino = (st.st_dev, st.st_ino)
        self._servers.append(srv)
        self.addresses.append(f"unix:{path}")

    async def _start_inherited(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        if sock.type != socket.SOCK_STREAM:
            raise ServerError(f"inherited fd {fd} is not a stream socket")
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(
                self.admission.gate, sock=sock, backlog=LISTEN_BACKLOG
            )
            name = sock.getsockname()
            self.addresses.append(f"unix:{name or '?'} (fd {fd})")
        else:
            srv = await loop.create_server(self.admission.gate, sock=sock, backlog=LISTEN_BACKLOG)
            addr = sock.getsockname()
            self.addresses.append(f"{addr[0]}:{addr[1]} (fd {fd})")
        self._servers.append(srv)

    async def _start_stdio(self, loop: asyncio.AbstractEventLoop) -> None:
        self.addresses.append("stdio")
        if self.config.tls != "off" and not stdio.stdin_is_socket():
            raise ServerError(
                "--tls with --stdio needs stdin to be a socket (as libnbd connect_command "
                "passes); TLS cannot run over pipes"
            )
        session = await stdio.connect(loop, self.admission)
        if session is None:  # refused: there is nothing to serve
            self.request_shutdown()
        else:
            session.closed.add_done_callback(lambda _f: self.request_shutdown())
        # a placeholder so "no listener" is not reported
        self._servers.append(_NullServer())

    # --- run / stop -----------------------------------------------------------------------------
    async def serve_forever(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    def request_shutdown(self) -> None:
        """Start shutdown from a signal handler or callback (idempotent)."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        if self._shutdown_task is not None and self._shutdown_task is not asyncio.current_task():
            await asyncio.shield(self._shutdown_task)
            return
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.current_task()
        ctx = self.ctx
        ctx.shutdown.is_set = True
        await self._close_listeners()
        sessions = list(ctx.sessions)
        for s in sessions:
            s.begin_shutdown()
        if sessions:
            log.debug("shutdown: waiting for %d connection(s) to finish", len(sessions))
        busy = [s.wait_idle() for s in sessions]
        if busy:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(b) for b in busy], timeout=SHUTDOWN_DRAIN_TIMEOUT
            )
            for p in pending:
                p.cancel()
        still_open = [s.closed for s in sessions if not s.closed.done()]
        if still_open:
            await asyncio.wait(still_open, timeout=SHUTDOWN_GRACE)
        for s in sessions:
            s.close("shutting down")
        closing = [s.closed for s in sessions if not s.closed.done()]
        if closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(asyncio.gather(*closing)), SHUTDOWN_CLOSE_TIMEOUT
                )
            for s in sessions:
                if not s.closed.done():
                    s.abort()
        await persistence.save_all(self.registry)
        self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._stopped is not None:
            self._stopped.set()

    async def _close_listeners(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self._servers.clear()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self._unix_path)
            self._unix_path = None


def protocol_limits(config: ServerConfig) -> Limits:
    """The protocol core's :class:`Limits` from the configuration: the payload cap
    (``max-payload``); the string, option and query limits keep the protocol's defaults."""
    return Limits(max_payload=config.max_payload)


def raise_nofile_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``needed`` (at most the hard limit): the usual soft
    default of 1024 is below a few hundred connections' worth of sockets. Returns the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        if soft < needed:
            log.warning("open file limit %d is below the %d the connection cap needs", soft, needed)
    return int(soft)


def _budget(config: ServerConfig) -> MemoryBudget | None:
    """The server-wide memory budget for ``global_mem_limit`` (None when unlimited)."""
    if not config.global_mem_limit:
        return None
    return MemoryBudget(config.global_mem_limit)


class _NullServer:
    """Stands in for a listener in stdio mode."""

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse other existing files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ServerError(f"unix socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"unix socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as e:
        raise ServerError(f"unix socket {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise ServerError(f"unix socket {path} is in use by another server")


class ServeHooks(Protocol):
    """Operator surface started next to the listeners (control socket, SIGHUP reload).

    ``start`` runs before the listeners bind (so READY=1 covers it); an exception from it is
    a start failure (its message logged, exit 1). ``stopping`` runs when SIGTERM/SIGINT starts
    the shutdown, before any connection is closed. ``close`` runs once serving has stopped."""

    async def start(self, server: Server) -> None: ...

    def stopping(self) -> None: ...

    async def close(self) -> None: ...


async def serve(config: ServerConfig, *, hooks: ServeHooks | None = None) -> int:
    """Run a server until SIGTERM/SIGINT (or the stdio connection ends). Returns the exit code."""
    server = Server(config)
    try:
        if hooks is not None:
            try:
                await hooks.start(server)
            except Exception as e:  # noqa: BLE001 - a hook's failure is a start failure
                raise ServerError(str(e)) from e
        await server.start()
    except (ServerError, ConfigError) as e:
        log.error("%s", e)
        if hooks is not None:
            await hooks.close()
        server.registry.close()
        server.executor.shutdown(wait=False)
        return 1
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if hooks is not None:
            hooks.stopping()
        server.request_shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    await server.serve_forever()
    if hooks is not None:
        await hooks.close()
    log.debug("stopped")
    return 0


def run(config: ServerConfig, *, hooks: ServeHooks | None = None) -> int:
    """Blocking entry point for ``zramd serve``."""
    log.debug("event loop: %s", install_uvloop())
    log.debug("malloc: %s", tune_malloc())
    return asyncio.run(serve(config, hooks=hooks))
