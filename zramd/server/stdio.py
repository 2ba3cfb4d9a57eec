"""The stdio transport: one connection on fd 0/1 (``zramd serve --stdio``).

Theory of operation
-------------------
:func:`connect` serves the one connection a parent process hands us on stdin/stdout. If stdin
is a socket (libnbd ``connect_command`` passes a socketpair), it is used directly as an accepted
socket, so TLS and busy polling work as on any socket. Otherwise stdin and stdout are two pipes,
and :class:`PipeTransport` presents them to the session as one ``asyncio.Transport``: reads
come from the stdin pipe (through :class:`_ReadSide`), writes, write-buffer limits and
``pause_writing``/``resume_writing`` from the stdout pipe (through :class:`_WriteSide`).
``start_tls`` is impossible on such a pair, so the listener refuses ``--tls`` with pipes
(:func:`stdin_is_socket`).

Either way the connection goes through admission like an accepted one (``server/admission.py``).
Invariants of the pipe pair: the session sees ``connection_lost`` exactly once, when the stdout
side is gone (our replies are flushed first on ``close``); EOF on stdin is only
``eof_received`` (the session still writes its last replies); after ``close``/``abort`` nothing
more is written.

This module knows no NBD and no device: it moves bytes between two fds and one protocol.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from typing import Any

from zramd.server.admission import Admission
from zramd.server.session import Session


def stdin_is_socket() -> bool:
    """Whether fd 0 is a socket (else a pipe pair is served)."""
    return stat.S_ISSOCK(os.fstat(0).st_mode)


async def connect(loop: asyncio.AbstractEventLoop, admission: Admission) -> Session | None:
    """Serve fd 0/1; the session, or None if admission refused the connection."""
    if stdin_is_socket():
        sock = socket.socket(fileno=os.dup(0))
        sock.setblocking(False)
        _, gate = await loop.connect_accepted_socket(admission.gate, sock=sock)
        return gate.session
    pt = PipeTransport()
    wfile = os.fdopen(os.dup(1), "wb", buffering=0)
    pt.wt, _ = await loop.connect_write_pipe(lambda: _WriteSide(pt), wfile)
    session = admission.admit(pt)
    if session is not None:
        rfile = os.fdopen(os.dup(0), "rb", buffering=0)
        pt.rt, _ = await loop.connect_read_pipe(lambda: _ReadSide(pt), rfile)
    return session


class PipeTransport(asyncio.Transport):
    """stdin (read) + stdout (write) pipes presented as one transport to a protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.rt: asyncio.ReadTransport | None = None
        self.wt: asyncio.WriteTransport | None = None
        self.proto: asyncio.Protocol | None = None
        self._closed = False
        self._lost_called = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "stdio" if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.proto = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.proto is not None
        return self.proto

    def is_closing(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.wt is not None and not self._closed:
            self.wt.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if self.wt is not None and not self._closed:
            self.wt.writelines(list_of_data)

    def pause_reading(self) -> None:
        if self.rt is not None:
            self.rt.pause_reading()

    def resume_reading(self) -> None:
        if self.rt is not None:
            self.rt.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.wt is not None:
            self.wt.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.wt.get_write_buffer_size() if self.wt is not None else 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.rt is not None:
            self.rt.close()
        if self.wt is not None:
            self.wt.close()  # flushes, then connection_lost on the writer side
        else:
            self._lost(None)

    def abort(self) -> None:
        self._closed = True
        if self.rt is not None:
            self.rt.close()
        if self.wt is not None:
            self.wt.abort()
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if not self._lost_called and self.proto is not None:
            self._lost_called = True
            self.proto.connection_lost(exc)


class _ReadSide(asyncio.Protocol):
    """The stdin pipe's protocol: forwards data and EOF."""

    def __init__(self, pt: PipeTransport) -> None:
        self.pt = pt

    def data_received(self, data: bytes) -> None:
        if self.pt.proto is not None:
            self.pt.proto.data_received(data)

    def eof_received(self) -> bool:
        if self.pt.proto is not None:
            self.pt.proto.eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _WriteSide(asyncio.Protocol):
    """The stdout pipe's protocol: forwards flow control and the end of the connection."""

    def __init__(self, pt: PipeTransport) -> None:
        self.pt = pt

    def pause_writing(self) -> None:
        if self.pt.proto is not None:
            self.pt.proto.pause_writing()

    def resume_writing(self) -> None:
        if self.pt.proto is not None:
            self.pt.proto.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pt._lost(exc)
