"""Blocking control-socket client used by the CLI.

Theory of operation
-------------------
:class:`ControlClient` opens the Unix socket lazily, sends one request line, reads
one answer line and returns the ``result`` or raises :class:`ControlError` with the
daemon's message. An unreachable daemon gives a message naming the socket path and
what to do. :func:`socket_is_live` is how a second ``serve`` detects a running
daemon: a path that accepts a connection is live; one that refuses is stale.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from zramd.config import CONTROL_ENV, DEFAULT_CONTROL_PATH
from zramd.control.protocol import (
    CLIENT_TIMEOUT,
    MAX_LINE,
    ControlError,
    decode,
    encode,
)

#: Seconds to wait when probing whether a socket is live.
PROBE_TIMEOUT = 2.0


def socket_is_live(path: str) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class ControlClient:
    def __init__(self, path: str | None = None, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL_PATH
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                refused = e.errno == errno.ECONNREFUSED
                why = "no daemon is listening" if refused else "no such socket"
                raise ControlError(
                    f"cannot reach zramd at {self.path}: {why} (is `zramd serve` running? "
                    "use --control PATH to pick its control socket)"
                ) from None
            if e.errno == errno.EACCES:
                raise ControlError(
                    f"cannot reach zramd at {self.path}: permission denied (the control "
                    "socket is root-only)"
                ) from None
            raise ControlError(f"cannot reach zramd at {self.path}: {e.strerror}") from None
        self._sock = s
        return s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, s: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ControlError("control answer too long")
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise ControlError(f"zramd at {self.path} did not answer in time") from None
            if not chunk:
                raise ControlError(f"zramd at {self.path} closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(self, op: str, **args: Any) -> Any:
        """Send one request; return its result or raise ControlError."""
        s = self._connect()
        try:
            s.sendall(encode({"op": op, **args}))
        except OSError as e:
            self.close()
            raise ControlError(f"lost connection to zramd at {self.path}: {e.strerror}") from None
        try:
            answer = decode(self._readline(s))
        except ControlError:
            self.close()
            raise
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error", "unknown error")))
        return answer.get("result")
