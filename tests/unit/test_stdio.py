"""``zramd serve --stdio`` over a pipe pair (zramd/server/stdio.py), with raw NBD bytes.

libnbd's ``connect_command`` passes a socketpair (tests/e2e/test_exports.py covers that); here
stdin and stdout are pipes, so the session runs on the pipe transport.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import IO

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
REQ = struct.Struct(">IHHQQI")
REQ_MAGIC = 0x25609513
SIMPLE = struct.Struct(">IIQ")
SIMPLE_MAGIC = 0x67446698
READ, WRITE, DISC = 0, 1, 2


def read_exactly(f: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def test_pipes_serve_one_connection_then_exit() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "zramd", "serve", "--stdio", "--control", "", "--export", "p=1M"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LISTEN_PID": "", "LISTEN_FDS": ""},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        w, r = proc.stdin, proc.stdout
        magic, opt, _flags = struct.unpack(">QQH", read_exactly(r, 18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        name = b"p"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        w.flush()
        while True:
            m, _o, typ, ln = struct.unpack(">QIII", read_exactly(r, 20))
            assert m == OPT_REPLY_MAGIC and typ < 1 << 31, hex(typ)
            read_exactly(r, ln)
            if typ == REP_ACK:
                break
        payload = bytes(range(256)) * 32  # 8 KiB
        w.write(REQ.pack(REQ_MAGIC, 0, WRITE, 1, 4096, len(payload)) + payload)
        w.write(REQ.pack(REQ_MAGIC, 0, READ, 2, 4096, len(payload)))
        w.flush()
        assert SIMPLE.unpack(read_exactly(r, SIMPLE.size)) == (SIMPLE_MAGIC, 0, 1)
        assert SIMPLE.unpack(read_exactly(r, SIMPLE.size)) == (SIMPLE_MAGIC, 0, 2)
        assert read_exactly(r, len(payload)) == payload
        w.write(REQ.pack(REQ_MAGIC, 0, DISC, 3, 0, 0))
        w.close()
        assert r.read() == b""  # the server closed its side
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
