"""The operator side of a running daemon: the control socket, SIGHUP reload and metrics.

Theory of operation
-------------------
:class:`Operator` is built with the live export registry and what ``serve`` was told (control
socket path, configuration file, exports given as flags), and:

- ``await start()`` binds the control socket (refusing if another daemon owns it) and installs
  the SIGHUP handler (always: SIGHUP's default action would kill the daemon and its data);
- ``await reload()`` re-reads the file and applies its exports (``control/reload.py``); flag
  exports win over file exports of the same name and are always kept (``config.merge_exports``).
  Top-level keys (listeners, limits, TLS, swap, metrics) are not applied: each one that differs
  from the file the daemon started with is logged at warning, ``KEY: needs a restart``, at every
  reload until the restart. A file
  that does not load changes nothing: the error is logged and raised as ControlError, so the
  control ``reload`` answers ``{"ok": false}`` and ``zramd reload`` exits 1;
- ``await close()`` removes both.

:func:`stopping_report` is what a stop loses, logged at warning when shutdown begins
(SIGTERM/SIGINT, ``OperatorHooks.stopping``): each export with clients or stored data, its
clients, and the bytes it holds, since the data lives only in this process.

:class:`OperatorHooks` is the ``ServeHooks`` the server's startup runs before binding its
listeners: an :class:`Operator` (running without the *default* control socket, with a warning,
when that one cannot be had) and, with ``--metrics``, the Prometheus server. Errors at start are
:class:`~zramd.control.protocol.ControlError` or OSError with one line the server logs. Swap
safety (``system.apply_swap_safety``, applied by ``cli/serve.py``) and ``READY=1``
(``server/listener.py``) are not done here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from zramd.config import ConfigError, ExportConfig, FileConfig, format_size, merge_exports
from zramd.control.protocol import ControlError
from zramd.control.reload import apply_exports
from zramd.control.server import ControlServer

log = logging.getLogger("zramd.control")


def stopping_report(registry: Any) -> list[str]:
    """One line per export that has clients or data: what stopping the daemon loses (or, for
    an export with a persist file, keeps)."""
    lines = []
    for exp in registry:
        stored = int(exp.device.stats.as_dict()["orig_data_size"])
        if not exp.clients and not stored:
            continue
        clients = ", ".join(sorted(s.label for s in exp.sessions)) or "none"
        fate = (
            f"keeps {format_size(stored)} of data in its snapshot {exp.config.persist}"
            if exp.config.persist is not None
            else f"loses {format_size(stored)} of data"
        )
        lines.append(
            f"stopping: export {exp.name} {fate} ({stored} bytes stored); clients: {clients}"
        )
    return lines


class Operator:
    def __init__(
        self,
        registry: Any,
        *,
        control_path: str | None = None,
        config_path: str | None = None,
        flag_exports: list[ExportConfig] | None = None,
        managed: set[str] | None = None,
        started: FileConfig | None = None,
    ) -> None:
        self.registry = registry
        self.control_path = control_path
        self.config_path = config_path
        #: the file as read at start: what the top-level keys of the running daemon say
        self.started = started
        self.flag_exports = list(flag_exports or [])
        self.managed: set[str] = set(managed) if managed is not None else {
            e.name for e in registry
        }
        self.control: ControlServer | None = None
        self._sighup = False
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.control_path:
            self.control = ControlServer(
                self.registry, self.control_path, reload=self.reload if self.config_path else None
            )
            await self.control.start()
        # Always take SIGHUP: its default action would kill the daemon (and lose its data)
        # when `systemctl reload` is used without a configuration file.
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            if self.config_path:
                log.warning("cannot install the SIGHUP handler; reload via the control socket")

    def _on_sighup(self) -> None:
        if not self.config_path:
            log.info("SIGHUP: no configuration file to reload (start with --config FILE)")
            return
        log.info("SIGHUP: reloading %s", self.config_path)
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        """SIGHUP's reload: a failure is already logged by :meth:`reload`."""
        with contextlib.suppress(ControlError):
            await self.reload()

    async def reload(self) -> list[str]:
        """Re-read the configuration file and apply it; returns what changed. Raises
        ControlError (logged) when the file does not load: nothing is changed then."""
        from zramd.configfile import changed_keys, load_file

        if not self.config_path:
            return []
        async with self._reload_lock:
            try:
                fc = load_file(self.config_path)
            except ConfigError as e:
                msg = f"reload failed, configuration unchanged: {e}"
                log.error("%s", msg)
                raise ControlError(msg) from None
            wanted = merge_exports(fc.server.exports, self.flag_exports)
            self.managed, lines = apply_exports(self.registry, wanted, self.managed)
            if self.started is not None:
                for key in changed_keys(self.started, fc):
                    msg = f"{key}: needs a restart"
                    log.warning("%s", msg)
                    lines.append(msg)
            if not lines:
                lines = ["no change"]
                log.info("reload: no change")
            return lines

    async def close(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        for t in list(self._tasks):
            t.cancel()
        if self.control is not None:
            await self.control.close()
            self.control = None


class OperatorHooks:
    """``ServeHooks`` for ``zramd.server.listener.serve``: builds and runs an :class:`Operator`
    on the server's registry before the listeners bind."""

    def __init__(
        self,
        *,
        control_path: str | None,
        control_required: bool = True,
        file: FileConfig | None = None,
        flag_exports: list[ExportConfig] | None = None,
        metrics: str | None = None,
    ) -> None:
        self.control_path = control_path
        self.control_required = control_required
        self.metrics_address = metrics
        self.metrics: Any = None
        self.file = file
        self.config_path = file.path if file is not None else None
        self.flag_exports = flag_exports or []
        self.operator: Operator | None = None
        self.registry: Any = None
        self._stopping = False

    async def start(self, server: Any) -> None:
        self.registry = server.registry
        op = Operator(
            server.registry,
            control_path=self.control_path,
            config_path=self.config_path,
            flag_exports=self.flag_exports,
            started=self.file,
        )
        try:
            await op.start()
        except (ControlError, OSError) as e:
            if self.control_required:
                await op.close()
                raise
            # the default control socket is optional: run without it, say why
            log.warning("%s; running without a control socket (use --control PATH)", e)
            op.control_path = None
            await op.close()
            op = Operator(server.registry, config_path=self.config_path,
                          flag_exports=self.flag_exports, started=self.file)
            await op.start()
        self.operator = op
        if self.metrics_address:
            from zramd.control.metrics import MetricsServer

            metrics = MetricsServer(server.registry, self.metrics_address)
            try:
                await metrics.start()
            except Exception:
                await self.close()
                raise
            self.metrics = metrics

    def stopping(self) -> None:
        """Shutdown begins: say what is lost (once)."""
        if self._stopping or self.registry is None:
            return
        self._stopping = True
        for line in stopping_report(self.registry):
            log.warning("%s", line)

    async def close(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        if self.operator is not None:
            await self.operator.close()
            self.operator = None
