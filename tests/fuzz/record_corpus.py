#!/usr/bin/env python3
"""Record the seed corpus: real clients' client->server byte streams, through a recording proxy.

Theory of operation
-------------------
A zramd server is started on a private Unix socket with the fuzz harness's export set
(:data:`tests.fuzz.harness.EXPORTS`). A small asyncio proxy listens on a second Unix socket and
relays every connection to zramd, writing what the *client* sent to
``tests/fuzz/corpus/<client>-<n>.bin`` (the server's replies are relayed, not recorded: the fuzz
targets play the client). Each client below then runs once against the proxy: nbdinfo (info,
list, map), qemu-io (writes, reads, zeroes, discard, flush), nbdcopy (in and out) and libnbd with
structured replies off (what the kernel client speaks: simple replies, EXPORT_NAME-free GO, no
meta contexts). Recordings are small (a few KiB each) and committed; rerun this script to refresh
them. It must not know the protocol: it copies bytes.

    .venv/bin/python tests/fuzz/record_corpus.py [OUTDIR]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from harness import EXPORTS  # noqa: E402

#: Seconds a client may take.
CLIENT_TIMEOUT_S = 60.0
#: Bytes of the payload file nbdcopy copies (keeps the recording a few KiB).
COPY_BYTES = 6 * 1024


def _zramd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "zramd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zramd"]


class Recorder:
    """The proxy: one file per relayed connection, named after the current client label."""

    def __init__(self, upstream: str, outdir: Path) -> None:
        self.upstream = upstream
        self.outdir = outdir
        self.label = "client"
        self.count: dict[str, int] = {}
        self.files: list[Path] = []

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        n = self.count.get(self.label, 0)
        self.count[self.label] = n + 1
        path = self.outdir / f"{self.label}-{n}.bin"
        self.files.append(path)
        sr, sw = await asyncio.open_unix_connection(self.upstream)
        with open(path, "wb") as rec:

            async def c2s() -> None:
                while data := await cr.read(65536):
                    rec.write(data)
                    sw.write(data)
                    await sw.drain()
                if sw.can_write_eof():
                    sw.write_eof()

            async def s2c() -> None:
                while data := await sr.read(65536):
                    cw.write(data)
                    await cw.drain()
                cw.close()

            try:
                await asyncio.gather(c2s(), s2c())
            except (ConnectionError, OSError):
                pass
        sw.close()
        cw.close()


def clients(uri: str, ro_uri: str, sock: str, work: Path) -> list[tuple[str, list[str] | None]]:
    """(label, argv) pairs; argv None marks the in-process libnbd client."""
    src = work / "src.bin"
    src.write_bytes(bytes((i * 7 + i // 4096) & 0xFF for i in range(COPY_BYTES)))
    out = work / "out.bin"
    return [
        ("nbdinfo", ["nbdinfo", uri]),
        ("nbdinfo-list", ["nbdinfo", "--list", f"nbd+unix://?socket={sock}"]),
        ("nbdinfo-map", ["nbdinfo", "--map", uri]),
        ("nbdinfo-ro", ["nbdinfo", "--can", "write", ro_uri]),
        (
            "qemu-io",
            [
                "qemu-io", "-f", "raw", uri,
                "-c", "write -P 0x5a 0 4k",
                "-c", "write -P 0xa5 6144 1k",
                "-c", "read -P 0x5a 0 4k",
                "-c", "write -z 8192 8k",
                "-c", "discard 65536 64k",
                "-c", "flush",
                "-c", "read 0 12k",
            ],
        ),
        ("qemu-io-ro", ["qemu-io", "-r", "-f", "raw", ro_uri, "-c", "read 0 4k"]),
        ("nbdcopy-in", ["nbdcopy", str(src), uri]),
        ("nbdcopy-out", ["nbdcopy", "--requests=4", uri, str(out)]),
        ("kernel", None),
    ]


def kernel_like(uri: str) -> None:
    """libnbd with structured replies off: simple replies only, like the Linux nbd driver."""
    import nbd

    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri)
    size = h.get_size()
    assert size > 0
    h.pwrite(b"\x11" * 4096, 0)
    h.pwrite(bytes(range(256)) * 4, 4096 + 512)
    h.pread(8192, 0)
    h.flush()
    h.trim(4096, 8192)
    h.zero(4096, 12288)
    h.pread(4096, size - 4096)
    h.shutdown()


async def record(outdir: Path) -> list[Path]:
    work = Path(tempfile.mkdtemp(prefix="zramd-rec-"))
    server_sock = str(work / "zramd.sock")
    proxy_sock = str(work / "proxy.sock")
    args = []
    for name, size, opts in EXPORTS:
        args += ["--export", f"{name}={size // 1024}K" + (f",{opts}" if opts else "")]
    proc = subprocess.Popen(
        _zramd() + ["serve", "--unix", server_sock, "--port", "0", "--control", ""] + args,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(server_sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("zramd did not start")
            await asyncio.sleep(0.05)
        rec = Recorder(server_sock, outdir)
        proxy = await asyncio.start_unix_server(rec.handle, proxy_sock)
        name = EXPORTS[0][0]
        ro = next(n for n, _, o in EXPORTS if "read-only" in o)
        uri = f"nbd+unix:///{name}?socket={proxy_sock}"
        ro_uri = f"nbd+unix:///{ro}?socket={proxy_sock}"
        for label, argv in clients(uri, ro_uri, proxy_sock, work):
            rec.label = label
            if argv is None:
                await asyncio.to_thread(kernel_like, uri)
            else:
                p = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
                )
                rc = await asyncio.wait_for(p.wait(), CLIENT_TIMEOUT_S)
                if rc not in (0, 2 if label == "nbdinfo-ro" else 0):  # --can: 2 means "no"
                    raise SystemExit(f"{label}: {argv} exited {rc}")
            await asyncio.sleep(0.2)  # let the proxy finish writing the transcript
        proxy.close()
        await proxy.wait_closed()
        return rec.files
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus"
    outdir.mkdir(parents=True, exist_ok=True)
    files = asyncio.run(record(outdir))
    for f in files:
        print(f"{f.relative_to(outdir.parent) if f.is_relative_to(outdir.parent) else f}: "
              f"{f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
