"""A tiny raw-socket NBD client for hostile and out-of-spec tests.

Theory of operation: written from the spec (nbd.md section 1), independently of zramd's own
protocol package, so the tests do not share the server's mistakes. Blocking sockets with
timeouts; every read is exact (`recv_exact`) and a closed peer raises `PeerClosed`. It knows
fixed-newstyle haggling (options, GO, ERR replies), the 28-byte request and both reply shapes.
"""

from __future__ import annotations

import socket
import struct
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_TOO_BIG = 0x80000009
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ESHUTDOWN = 108

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 32769, 32770
_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
DEFAULT_TIMEOUT_S = 10.0


class PeerClosed(Exception):
    """The server closed (or reset) the connection."""


class RawClient:
    def __init__(self, addr: tuple[str, int] | str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.size = 0
        self.tflags = 0

    # -- bytes --------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as exc:
                raise PeerClosed(f"reset after {len(buf)}/{n} bytes") from exc
            if not chunk:
                raise PeerClosed(f"EOF after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within `timeout` (data read is discarded)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    return True
            return False
        finally:
            self.sock.settimeout(DEFAULT_TIMEOUT_S)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handshake ----------------------------------------------------------------------------
    def greeting(self, client_flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert ihaveopt == IHAVEOPT, hex(ihaveopt)
        assert hflags & FLAG_FIXED_NEWSTYLE, "server must offer fixed newstyle"
        self.send(struct.pack(">I", client_flags))
        return int(hflags)

    def send_option(self, opt: int, data: bytes = b"", length: int | None = None) -> None:
        self.send(_OPT_HEADER.pack(IHAVEOPT, opt, len(data) if length is None else length) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = _OPT_REPLY.unpack(self.recv_exact(_OPT_REPLY.size))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def go(self, name: str = "", opt: int = OPT_GO) -> None:
        """GO (or INFO) on `name`; raises AssertionError on an error reply."""
        raw = name.encode()
        self.send_option(opt, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        while True:
            ropt, rtype, data = self.read_option_reply()
            assert ropt == opt, (ropt, opt)
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, f"GO failed: reply {rtype:#x} {data!r}"
            (itype,) = struct.unpack(">H", data[:2])
            if itype == INFO_EXPORT:
                self.size, self.tflags = struct.unpack(">QH", data[2:12])
        assert self.size > 0, "no INFO_EXPORT before ACK"

    def connect_export(self, name: str = "") -> RawClient:
        self.greeting()
        self.go(name)
        return self

    # -- transmission -------------------------------------------------------------------------
    def request(
        self, cmd: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0,
        payload: bytes = b"", magic: int = REQUEST_MAGIC,
    ) -> None:
        self.send(REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)

    def read_simple_reply(self, expect_cookie: int | None = None) -> int:
        magic, error, cookie = SIMPLE_REPLY.unpack(self.recv_exact(SIMPLE_REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC, f"expected a simple reply, got magic {magic:#x}"
        if expect_cookie is not None:
            assert cookie == expect_cookie, (cookie, expect_cookie)
        return int(error)

    def read_chunks(self, cookie: int) -> list[tuple[int, int, bytes]]:
        """Structured reply chunks (flags, type, payload) of one request, up to DONE."""
        chunks = []
        while True:
            magic, flags, ctype, rcookie, length = CHUNK.unpack(self.recv_exact(CHUNK.size))
            assert magic == STRUCTURED_REPLY_MAGIC, f"expected a chunk, got magic {magic:#x}"
            assert rcookie == cookie, (rcookie, cookie)
            chunks.append((flags, ctype, self.recv_exact(length)))
            if flags & REPLY_FLAG_DONE:
                return chunks

    def read_simple_or_chunk_error(self, cookie: int) -> int:
        """The error of a non-READ reply, simple or structured (0 = success)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, rcookie = struct.unpack(">IQ", self.recv_exact(12))
            assert rcookie == cookie
            return int(error)
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        err = 0
        rest = self.recv_exact(CHUNK.size - 4)
        while True:
            flags, ctype, rcookie, length = struct.unpack(">HHQI", rest)
            assert rcookie == cookie
            payload = self.recv_exact(length)
            if ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
                err = err or struct.unpack(">I", payload[:4])[0]
            if flags & REPLY_FLAG_DONE:
                return int(err)
            magic, flags2, ctype2, rcookie2, length2 = CHUNK.unpack(self.recv_exact(CHUNK.size))
            rest = struct.pack(">HHQI", flags2, ctype2, rcookie2, length2)

    def read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        self.request(CMD_READ, offset, length, cookie)
        err = self.read_simple_reply(cookie)
        assert err == 0, f"READ {offset}+{length} failed with {err}"
        return self.recv_exact(length)

    def write(self, offset: int, data: bytes, cookie: int = 8) -> int:
        self.request(CMD_WRITE, offset, len(data), cookie, payload=data)
        return self.read_simple_reply(cookie)

    def flush(self, cookie: int = 9) -> int:
        self.request(CMD_FLUSH, 0, 0, cookie)
        return self.read_simple_reply(cookie)

    def disconnect(self) -> None:
        try:
            self.request(CMD_DISC)
        finally:
            self.close()
