"""Multi-page groups with real clients: an image of real files copied in with nbdcopy, marked
idle and packed into groups through the CLI (``zramd idle``, ``zramd recompress
--group-pages``), read back byte for byte; fio writes with crc32c checksums, the device is
grouped, and fio verifies every block, then overwrites grouped pages and verifies again; a
memory limit holds while packing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from zramd.control.client import ControlClient

from .conftest import MiB, Server, run, zramd_argv
from .zramd_with import start_zramd

IMAGE_BYTES = 24 * MiB
EXPORT = "zram0"


def _real_files_image(path: Path, budget: int) -> Path:
    """Files from /usr/share back to back, with zero gaps between them (as on a file system)."""
    got = 0
    with open(path, "wb") as out:
        for dirpath, dirnames, filenames in os.walk("/usr/share"):
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    with open(p, "rb") as f:
                        data = f.read(budget - got)
                except OSError:
                    continue
                out.write(data + bytes(-len(data) % 4096 + 4096 * (len(data) % 3)))
                got = out.tell()
                if got >= budget:
                    return path
    return path


def _sha(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def _cli(server: Server, *args: str) -> str:
    control = str(Path(server.workdir) / "control.sock")
    return run(zramd_argv() + [*args, "--control", control], timeout=120).stdout


def _stat(server: Server) -> dict[str, Any]:
    with ControlClient(str(Path(server.workdir) / "control.sock")) as c:
        stat: dict[str, Any] = c.call("stat", name=EXPORT)
    return stat


def _group_all(server: Server) -> str:
    _cli(server, "idle", EXPORT, "--all")
    return _cli(server, "recompress", EXPORT, "--group-pages", "16")


@pytest.mark.slow
def test_nbdcopy_in_group_nbdcopy_out(tmp_path: Path) -> None:
    image = _real_files_image(tmp_path / "files.img", IMAGE_BYTES)
    size = image.stat().st_size
    server = start_zramd(tmp_path / "srv", exports=[(EXPORT, 32 * MiB, "algorithm=lz4")])
    try:
        uri = server.uri(EXPORT, unix=True)
        run(["nbdcopy", "--flush", str(image), uri], timeout=120)
        before = _stat(server)
        out = _group_all(server)
        assert "groups" in out, out
        after = _stat(server)
        mm_before, mm_after = before["mm_stat"], after["mm_stat"]
        assert mm_after["orig_data_size"] == mm_before["orig_data_size"]
        assert mm_after["compr_data_size"] < 0.9 * mm_before["compr_data_size"], (before, after)
        back = tmp_path / "back.img"
        run(["nbdcopy", uri, str(back)], timeout=120)
        assert _sha(back, size) == _sha(image, size)
        # a second pass over the grouped device finds nothing left to pack
        assert " 0 grouped" in _group_all(server)
        server.assert_alive()
    finally:
        server.stop()


def _fio(uri: str, out: Path, *extra: str) -> dict[str, Any]:
    run([
        "fio", "--name=groups", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--size=16M",
        "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
        "--buffer_compress_percentage=70", "--refill_buffers", "--randseed=11",
        "--output-format=json", f"--output={out}", *extra,
    ], timeout=180)  # fmt: skip
    (job,) = json.loads(out.read_text())["jobs"]
    assert job["error"] == 0
    return job  # type: ignore[no-any-return]


@pytest.mark.slow
def test_fio_crc32c_verify_over_grouped_device(tmp_path: Path) -> None:
    server = start_zramd(tmp_path / "srv", exports=[(EXPORT, 32 * MiB, "algorithm=lz4")])
    try:
        uri = server.uri(EXPORT, unix=True)
        job = _fio(uri, tmp_path / "w.json", "--rw=randwrite", "--do_verify=0")
        assert job["write"]["io_bytes"] == 16 * MiB
        out = _group_all(server)
        assert _stat(server)["mm_stat"]["compr_data_size"] > 0
        assert "groups" in out and " 0 grouped" not in out, out
        job = _fio(uri, tmp_path / "v.json", "--rw=randwrite", "--verify_only")
        assert job["read"]["io_bytes"] == 16 * MiB, "every block verified from the groups"
        # overwrite and verify again: writes take pages out of groups, re-packs follow
        job = _fio(
            uri,
            tmp_path / "o.json",
            "--rw=randwrite",
            "--randseed=12",
            "--do_verify=1",
            "--size=8M",
        )
        assert job["read"]["io_bytes"] == 8 * MiB
        server.assert_alive()
    finally:
        server.stop()


@pytest.mark.slow
def test_memory_limit_holds_while_grouping(tmp_path: Path) -> None:
    image = _real_files_image(tmp_path / "files.img", 8 * MiB)
    size = image.stat().st_size
    server = start_zramd(tmp_path / "srv", exports=[(EXPORT, 16 * MiB, "algorithm=lz4")])
    try:
        uri = server.uri(EXPORT, unix=True)
        run(["nbdcopy", "--flush", str(image), uri], timeout=120)
        used = _stat(server)["mm_stat"]["mem_used_total"]
        _cli(server, "set", EXPORT, "--mem-limit", f"{used}B")
        _cli(server, "idle", EXPORT, "--all")
        control = str(Path(server.workdir) / "control.sock")
        proc = run(zramd_argv() + ["recompress", EXPORT, "--group-pages", "16",
                                   "--control", control], check=False)  # fmt: skip
        stat = _stat(server)["mm_stat"]
        assert stat["mem_used_total"] <= used
        assert stat["mem_used_max"] <= max(used, stat["mem_limit"])
        if proc.returncode:
            assert "memory limit" in proc.stderr + proc.stdout
        back = tmp_path / "back.img"
        run(["nbdcopy", uri, str(back)], timeout=120)
        assert _sha(back, size) == _sha(image, size)
    finally:
        server.stop()
