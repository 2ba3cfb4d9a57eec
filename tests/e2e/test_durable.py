"""Durable mode (``persist=PATH,sync=flush``) with real clients: the crash test.

A libnbd client writes random pages (single pages and runs of up to 16, in batches of requests
in flight at once), trims and zeroes ranges, writes some pages with FUA and flushes at random
points, while a model records, per page, the data as of the last completed FLUSH (or FUA write
of that page) and every write issued since. The server is killed with SIGKILL at a random moment
(sometimes while ``zramd snapshot`` takes a checkpoint), restarted on the same files, and every
page must then equal the model's durable data or one of the later writes: never older data,
never a torn or foreign page. :data:`CYCLES` cycles in CI (``ZRAMD_CRASH_CYCLES`` for a longer
run; docs/operator.md).

Also here: a clean stop leaves a snapshot and no journal; the journal's figures in ``stat``; a
journal of another export size stops the start with one line naming it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest

from .conftest import MiB, Server, run, zramd_argv
from .zramd_with import start_zramd, wait_for_log

EXPORT = "zram0"
SIZE = 8 * MiB
PAGE = 4096
NPAGES = SIZE // PAGE
CYCLES = int(os.environ.get("ZRAMD_CRASH_CYCLES", "50"))


class Model:
    """Per page: the durable data (None: zeros) and the data written since (issued, maybe not
    completed), oldest first."""

    def __init__(self) -> None:
        self.durable: dict[int, bytes | None] = {}
        self.since: dict[int, list[bytes | None]] = {}
        self.lock = threading.Lock()
        #: FLUSH requests completed
        self.flushes = 0

    def issued(self, first: int, pages: list[bytes | None]) -> None:
        with self.lock:
            for i, data in enumerate(pages):
                self.since.setdefault(first + i, []).append(data)

    def flushed(self) -> None:
        """A FLUSH completed: every write issued and completed before it is durable (the
        client waits for its writes before it flushes)."""
        with self.lock:
            for page, writes in self.since.items():
                self.durable[page] = writes[-1]
            self.since.clear()

    def fua(self, first: int, pages: list[bytes]) -> None:
        """A write with FUA completed: its pages are durable."""
        with self.lock:
            for i, data in enumerate(pages):
                self.durable[first + i] = data
                self.since.pop(first + i, None)

    def allowed(self, page: int) -> list[bytes | None]:
        return [self.durable.get(page), *self.since.get(page, [])]

    def settle(self, got: dict[int, bytes | None]) -> None:
        """After a restart: what was read back is now the durable data."""
        self.durable = dict(got)
        self.since.clear()


def _page(tag: int, rng: random.Random) -> bytes:
    """A page unlike any other (its tag), half compressible."""
    head = tag.to_bytes(8, "little") * 8
    return head + rng.randbytes(PAGE // 2 - len(head)) + bytes([tag & 0xFF]) * (PAGE // 2)


def _tag(page: bytes | None) -> str:
    return "zeros" if page is None else f"tag {int.from_bytes(page[:8], 'little')}"


def _connect(server: Server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(server.uri(EXPORT, unix=True))
    return h


def _client(
    server: Server,
    model: Model,
    rng: random.Random,
    tags: list[int],
    killed: threading.Event,
    errors: list[str],
) -> None:
    """Write, trim, zero and flush until the server is killed; an error before that, or one
    that is not the server's, goes to ``errors``."""
    try:
        h = _connect(server)
        while True:
            op = rng.random()
            if op < 0.75:  # a batch of writes in flight at once, on distinct pages
                starts = rng.sample(range(NPAGES), rng.randint(1, 8))
                cmds = []
                used: set[int] = set()
                for first in starts:
                    n = 1 if rng.random() < 0.7 else rng.randint(2, 16)
                    n = min(n, NPAGES - first)
                    span = set(range(first, first + n))
                    if span & used:
                        continue
                    used |= span
                    pages = []
                    for _ in range(n):
                        tags[0] += 1
                        pages.append(_page(tags[0], rng))
                    model.issued(first, list(pages))
                    cmds.append(h.aio_pwrite(b"".join(pages), first * PAGE))
                while cmds:
                    cmds = [c for c in cmds if not h.aio_command_completed(c)]
                    if cmds:
                        h.poll(-1)
            elif op < 0.83:
                first = rng.randrange(NPAGES)
                n = min(rng.randint(1, 32), NPAGES - first)
                model.issued(first, [None] * n)
                if rng.random() < 0.5:
                    h.trim(n * PAGE, first * PAGE)
                else:
                    h.zero(n * PAGE, first * PAGE)
            elif op < 0.9:
                first = rng.randrange(NPAGES)
                tags[0] += 1
                data = _page(tags[0], rng)
                model.issued(first, [data])
                h.pwrite(data, first * PAGE, nbd.CMD_FLAG_FUA)
                model.fua(first, [data])
            else:
                h.flush()
                model.flushed()
                model.flushes += 1
    except nbd.Error as e:
        if not killed.is_set():
            errors.append(f"{e} (before the server was killed)")
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(repr(e))


def _read_all(server: Server) -> dict[int, bytes | None]:
    h = _connect(server)
    got: dict[int, bytes | None] = {}
    try:
        step = 256 * PAGE
        for off in range(0, SIZE, step):
            buf = h.pread(step, off)
            for i in range(0, step, PAGE):
                page = buf[i : i + PAGE]
                got[(off + i) // PAGE] = None if page == bytes(PAGE) else page
    finally:
        h.shutdown()
    return got


def _start(workdir: Path, snap: Path, size: int = SIZE, extra: str = "") -> Server:
    return start_zramd(workdir, exports=[(EXPORT, size, f"persist={snap},sync=flush{extra}")])


def _snapshot_cli(server: Server) -> None:
    control = str(Path(server.workdir) / "control.sock")
    subprocess.run(
        zramd_argv() + ["snapshot", EXPORT, "--control", control],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )


def _backed_pages(server: Server) -> int:
    control = str(Path(server.workdir) / "control.sock")
    st = json.loads(run(zramd_argv() + ["stat", EXPORT, "--json", "--control", control]).stdout)
    return int(st["backing"]["bd_count"])


@pytest.mark.slow
@pytest.mark.parametrize("backed", [False, True], ids=["ram", "backing"])
def test_sigkill_at_random_moments_loses_nothing_flushed(tmp_path: Path, backed: bool) -> None:
    """``backing``: a memory limit of a quarter of the data and a backing file, so that pages
    are written back under pressure, checkpoints reference them and restarts read them."""
    snap = tmp_path / "s.snap"
    seed = int(os.environ.get("ZRAMD_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    model = Model()
    tags = [0]
    checked = replays = with_backed = 0
    cycles = CYCLES // 2 if backed else CYCLES
    extra = f",mem-limit=2M,backing={tmp_path / 'b.img'}" if backed else ""
    for cycle in range(cycles):
        server = _start(tmp_path / f"srv{cycle % 2}", snap, extra=extra)
        try:
            if backed:
                with_backed += _backed_pages(server) > 0
            got = _read_all(server)
            for page in range(NPAGES):
                allowed = model.allowed(page)
                assert got[page] in allowed, (
                    f"seed {seed}, cycle {cycle}: page {page} holds {_tag(got[page])}, the "
                    f"model allows {[_tag(a) for a in allowed]}"
                )
                checked += 1
            model.settle(got)
            replays += "replayed" in server.stderr()
            killed = threading.Event()
            errors: list[str] = []
            worker = threading.Thread(
                target=_client, args=(server, model, rng, tags, killed, errors)
            )
            worker.start()
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.3))
                threading.Thread(target=_snapshot_cli, args=(server,), daemon=True).start()
            time.sleep(rng.uniform(0.05, 0.6))
            killed.set()
            server.procs[0].send_signal(signal.SIGKILL)
            server.procs[0].wait()
            worker.join(timeout=30)
            assert not worker.is_alive() and not errors, errors
        finally:
            server.stop_quietly()
        for f in (tmp_path / f"srv{cycle % 2}").glob("*.sock"):
            f.unlink()
    assert replays >= cycles // 2, f"the journal was replayed in only {replays} of {cycles} starts"
    assert model.flushes >= cycles, f"only {model.flushes} FLUSH requests in {cycles} cycles"
    assert checked == cycles * NPAGES
    if backed:
        assert with_backed >= cycles // 4, f"pages written back at only {with_backed} starts"


def test_stop_leaves_a_snapshot_and_no_journal(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    data = os.urandom(2 * MiB)
    h = _connect(server)
    h.pwrite(data, 0)
    h.flush()
    control = str(Path(server.workdir) / "control.sock")
    st = json.loads(run(zramd_argv() + ["stat", EXPORT, "--json", "--control", control]).stdout)
    journal = st["journal"]
    assert journal["syncs"] == 1 and journal["records"] >= 1 and journal["bytes"] > len(data) // 2
    assert st["persist"]["sync"] == "flush"
    text = run(zramd_argv() + ["stat", EXPORT, "--control", control]).stdout
    assert "journal (sync=flush)" in text and "1 syncs" in text, text
    h.shutdown()
    server.stop()
    assert snap.exists() and not list(tmp_path.glob("s.snap.journal-*"))
    server = _start(tmp_path / "srv2", snap)
    try:
        assert _connect(server).pread(len(data), 0) == data
        assert "replayed" not in server.stderr()
    finally:
        server.stop()


def test_a_journal_of_another_size_stops_the_start(tmp_path: Path) -> None:
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    h = _connect(server)
    h.pwrite(b"j" * PAGE, 0)
    h.flush()
    server.stop_quietly()  # SIGKILL: the journal stays
    journals = list(tmp_path.glob("s.snap.journal-*"))
    assert journals
    workdir = tmp_path / "bad"
    workdir.mkdir()
    proc = subprocess.run(
        zramd_argv()
        + ["serve", "--unix", str(workdir / "nbd.sock"), "--port", "0",
           "--control", str(workdir / "control.sock"),
           "--export", f"{EXPORT}={2 * SIZE // 1024}K,persist={snap},sync=flush"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any(str(journals[0]) in line and str(SIZE) in line for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_flush_reaches_fdatasync_of_the_journal(tmp_path: Path) -> None:
    """What SIGKILL cannot show (the page cache survives it): a FLUSH after a write is not
    answered before the journal file was ``fdatasync``-ed, seen by strace on the daemon."""
    snap = tmp_path / "s.snap"
    server = _start(tmp_path / "srv", snap)
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-y", "-qq", "-e", "trace=fdatasync,fsync", "-o", str(trace),
         "-p", str(server.procs[0].pid)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not trace.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # attached to every thread
        h = _connect(server)
        rounds = 5
        for i in range(rounds):
            h.pwrite(bytes([i + 1]) * PAGE, i * PAGE)
            h.flush()
            seen = trace.read_text().count(".journal-")
            assert seen >= i + 1, f"FLUSH {i + 1} answered after {seen} journal syncs"
        h.shutdown()
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
        server.stop()


def test_create_on_a_running_daemon_restores_and_journals(tmp_path: Path) -> None:
    """``zramd create --persist --sync flush``: the export is restored (snapshot, journal)
    before clients can see it, and is durable from then on; a bad snapshot is refused with one
    line and the export is not created."""
    snap = tmp_path / "c.snap"
    server = start_zramd(tmp_path / "srv", exports=[("other", 4 * MiB, "")])
    control = str(Path(server.workdir) / "control.sock")
    create = zramd_argv() + ["create", EXPORT, "-s", "8M", "--persist", str(snap),
                             "--sync", "flush", "--control", control]  # fmt: skip
    try:
        run(create)
        h = _connect(server)
        data = os.urandom(PAGE * 3)
        h.pwrite(data, 5 * PAGE)
        h.flush()
        h.shutdown()
    finally:
        server.stop_quietly()  # SIGKILL: only the journal has it
    server = start_zramd(tmp_path / "srv2", exports=[("other", 4 * MiB, "")])
    control = str(Path(server.workdir) / "control.sock")
    try:
        run(create[:-1] + [control])
        assert "replayed" in server.stderr()
        assert _connect(server).pread(len(data), 5 * PAGE) == data
        run(zramd_argv() + ["destroy", EXPORT, "--force", "--control", control])
        snap.write_bytes(b"garbage" * 100)
        proc = subprocess.run(create[:-1] + [control], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and str(snap) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        listed = run(zramd_argv() + ["list", "--control", control]).stdout
        assert EXPORT not in listed.split()
    finally:
        server.stop()


def test_a_full_disk_fails_flush_until_a_checkpoint_fits(tmp_path: Path) -> None:
    """The journal's file system fills up (a tmpfs of 2 MiB): FLUSH answers EIO (the data stays
    served from RAM), the checkpoint asked for fails too and is retried; once there is room
    (the tmpfs grown), the retried checkpoint succeeds, FLUSH works again, and after SIGKILL a
    restart has every write, those of the failed period included."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    server: Server | None = None
    try:
        snap = mnt / "s.snap"
        server = _start(tmp_path / "srv", snap)
        h = _connect(server)
        first = os.urandom(MiB)
        h.pwrite(first, 0)
        h.flush()
        more = os.urandom(3 * MiB)  # does not fit beside it
        h.pwrite(more, MiB)
        with pytest.raises(nbd.Error) as exc:
            h.flush()
        assert "Input/output error" in str(exc.value)
        assert h.pread(len(more), MiB) == more  # still served
        log = wait_for_log(server, "checkpoint to")
        assert "failed" in log and "FLUSH fails until a checkpoint" in log
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        deadline = time.monotonic() + 60
        while True:  # the retried checkpoint (every 10 s) fits now
            try:
                h.flush()
                break
            except nbd.Error:
                assert time.monotonic() < deadline, server.stderr()
                time.sleep(1)
        assert "journal usable again" in server.stderr()
        last = os.urandom(PAGE)
        h.pwrite(last, 8 * MiB - PAGE)
        h.flush()
        server.stop_quietly()  # SIGKILL
        server = _start(tmp_path / "srv2", snap)
        h = _connect(server)
        assert h.pread(MiB, 0) == first and h.pread(len(more), MiB) == more
        assert h.pread(PAGE, 8 * MiB - PAGE) == last
    finally:
        if server is not None:
            server.stop_quietly()
        subprocess.run(["umount", str(mnt)], capture_output=True)
