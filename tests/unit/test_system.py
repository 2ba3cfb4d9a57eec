"""system.py: sd_notify datagrams, swap-safety calls, RAM size.

The privileged calls run in a subprocess so the test process itself is not locked
in memory or made unkillable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from zramd import system

IS_ROOT = os.geteuid() == 0


def _run(code: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_sd_notify_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert system.sd_notify("READY=1") is False


def test_sd_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert system.sd_notify("READY=1\nSTATUS=serving")
        assert srv.recv(4096) == b"READY=1\nSTATUS=serving"


def test_sd_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"zramd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert system.sd_notify("STOPPING=1")
        assert srv.recv(4096) == b"STOPPING=1"


def test_sd_notify_bad_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert system.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert system.sd_notify("READY=1") is False


def test_total_ram_matches_sysconf() -> None:
    ram = system.total_ram()
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < ram <= phys * 1.01
    assert ram > phys * 0.9


def test_swap_mode_validation() -> None:
    assert system.apply_swap_safety("off") == []
    with pytest.raises(ValueError, match="swap mode"):
        system.apply_swap_safety("yes")


def test_swap_safety_in_subprocess() -> None:
    """Whatever we hold, each protection is either applied or reported naming its capability."""
    code = """
import errno
import json
from zramd import system
warnings = system.apply_swap_safety("on")
locked = 0
for line in open("/proc/self/status"):
    if line.startswith("VmLck:"):
        locked = int(line.split()[1])
print(json.dumps({"warnings": warnings, "oom": system.get_oom_score_adj(),
                  "flusher": system.get_io_flusher(), "vmlck_kib": locked}))
"""
    res = _run(code)
    warnings = " ".join(res["warnings"])  # type: ignore[arg-type]
    if system.has_capability(system.CAP_IPC_LOCK):
        assert isinstance(res["vmlck_kib"], int) and res["vmlck_kib"] > 1000
        assert "mlockall" not in warnings
    else:
        assert "CAP_IPC_LOCK" in warnings
    if system.has_capability(system.CAP_SYS_RESOURCE):
        assert res["oom"] == -1000
        assert res["flusher"] == 1
        assert "CAP_SYS_RESOURCE" not in warnings
    else:
        # this host's container root lacks CAP_SYS_RESOURCE: both calls must say so
        assert res["oom"] != -1000
        assert "PR_SET_IO_FLUSHER" in warnings and "oom_score_adj" in warnings
        assert "CAP_SYS_RESOURCE" in warnings


def test_require_raises_or_applies() -> None:
    code = """
import errno
import json
from zramd import system
try:
    system.apply_swap_safety("require"); r = ""
except system.SwapSafetyError as e:
    r = str(e)
print(json.dumps({"require": r, "oom": system.get_oom_score_adj()}))
"""
    res = _run(code)
    full = system.has_capability(system.CAP_IPC_LOCK) and system.has_capability(
        system.CAP_SYS_RESOURCE
    )
    if full:
        assert res["require"] == "" and res["oom"] == -1000
    else:
        assert str(res["require"]).startswith("swap safety required but:")
        assert "CAP_" in str(res["require"])


def test_set_oom_score_adj_raise_is_allowed_in_subprocess() -> None:
    """Raising oom_score_adj needs no privilege: check the write really lands."""
    res = _run(
        "import json\nfrom zramd import system\n"
        "e = system.set_oom_score_adj(500)\n"
        "print(json.dumps({'e': e, 'v': system.get_oom_score_adj()}))"
    )
    assert res == {"e": 0, "v": 500}


def test_mlockall_rlimit_failure_names_capability() -> None:
    """Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK tiny, mlockall must fail and say so."""
    code = """
import json, resource
from zramd import system
try:
    import ctypes
    # drop CAP_IPC_LOCK from the effective set if we are root: use capsh-free approach by
    # lowering the rlimit; root with CAP_IPC_LOCK is exempt, so report what happened.
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (4096, 4096))
except Exception:
    pass
err = system.mlockall()
print(json.dumps({"err": err}))
"""
    res = _run(code)
    # As root (CAP_IPC_LOCK) mlockall ignores the rlimit; otherwise it fails with ENOMEM/EPERM.
    if IS_ROOT:
        assert res["err"] == 0
    else:
        assert res["err"] != 0


def test_require_raises_when_unprivileged() -> None:
    """Run as nobody via setpriv if available: require must raise naming the capability."""
    setpriv = "/usr/bin/setpriv"
    if not (IS_ROOT and os.path.exists(setpriv)):
        pytest.skip("needs root and setpriv to drop privileges")
    code = (
        "import json\nfrom zramd import system\n"
        "w = system.apply_swap_safety('on')\n"
        "try:\n    system.apply_swap_safety('require'); r = ''\n"
        "except system.SwapSafetyError as e:\n    r = str(e)\n"
        "print(json.dumps({'warnings': w, 'require': r}))\n"
    )
    # nobody may not reach the checkout or its venv (a clone under a 0700 mktemp directory):
    # run the stdlib-only zramd.system from a copy it can read, with the base interpreter
    pkg = Path(__file__).resolve().parents[2] / "zramd"
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        (Path(tmp) / "zramd").mkdir(mode=0o755)
        for name in ("__init__.py", "system.py"):
            shutil.copy(pkg / name, Path(tmp) / "zramd" / name)
            os.chmod(Path(tmp) / "zramd" / name, 0o644)
        python = getattr(sys, "_base_executable", sys.executable)
        env = dict(os.environ, PYTHONPATH=tmp)
        out = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all", python, "-c", code],
            capture_output=True, text=True, timeout=30, env=env, check=True, cwd=tmp,
        )  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    text = " ".join(res["warnings"])
    assert "CAP_IPC_LOCK" in text
    assert "CAP_SYS_RESOURCE" in text
    assert "swap safety required" in res["require"]
    assert "CAP_IPC_LOCK" in res["require"]


def test_release_pages_works_under_mlockall() -> None:
    """Plain MADV_DONTNEED fails on locked memory; release_pages must still free it."""
    code = """
import errno, json, mmap
from zramd import system
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
n = 64 << 20
locked = system.mlockall() == 0
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = b"x" * n
before = rss()
plain = 0
try:
    m.madvise(mmap.MADV_DONTNEED, 0, 4096)
except OSError as e:
    plain = e.errno
m[:4096] = b"x" * 4096
system.release_pages(m, 0, n)
print(json.dumps({"locked": locked, "plain": plain, "freed_kib": before - rss(),
                  "zero": m[:8] == bytes(8) and m[n - 8:] == bytes(8)}))
"""
    res = _run(code)
    assert res["zero"] is True
    assert res["freed_kib"] > 48 * 1024
    if res["locked"]:
        assert res["plain"] == errno.EINVAL  # why release_pages exists


def test_sync_file_range_starts_writeback_and_reports_errors(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        system.sync_file_range(
            f.fileno(), 0, 1 << 20, system.SYNC_FILE_RANGE_WRITE | system.SYNC_FILE_RANGE_WAIT_AFTER
        )
    with pytest.raises(OSError) as exc:
        system.sync_file_range(-1, 0, 4096, system.SYNC_FILE_RANGE_WRITE)
    assert exc.value.errno == errno.EBADF


_MALLOC_PROBE = """
import json, resource, sys
from zramd import system
said = system.tune_malloc() if sys.argv[1] == "tune" else "untuned"
def round_faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = bytearray(3 << 20)  # zero-filled: every page touched
    del b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
first = round_faults()
print(json.dumps({"said": said, "first": first, "second": round_faults()}))
"""


_ARENA_PROBE = """
import json, sys, threading
from zramd import system
said = system.tune_malloc()
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
out = {"said": said}
for mode in ("plain", "trimmed", "again"):
    box = []
    t = threading.Thread(target=lambda: box.append(bytearray(3 << 20)))  # a thread's arena
    t.start()
    t.join()
    before = rss_kib()
    if mode == "trimmed":
        with system.frees_trimmed():
            box.clear()
    else:
        box.clear()
    out[mode] = before - rss_kib()
print(json.dumps(out))
"""


def test_frees_trimmed_gives_a_thread_arenas_top_back() -> None:
    """3 MiB a thread allocated, freed: glibc keeps it at its arena's top (under the 4 MiB trim
    threshold, and malloc_trim does not shrink thread arenas); freed inside frees_trimmed, it
    goes back to the OS; after the block the tuned threshold holds again."""
    res = _malloc_probe("arena", script=_ARENA_PROBE)
    if res["said"] != "mmap threshold 4 MiB, trim threshold 4 MiB":
        pytest.skip(f"malloc not tuned here: {res['said']}")
    assert res["plain"] < 1024, res  # type: ignore[operator]
    assert res["trimmed"] > 2048, res  # type: ignore[operator]
    assert res["again"] < 1024, res  # type: ignore[operator]


def _malloc_probe(
    mode: str, env: dict[str, str] | None = None, script: str = _MALLOC_PROBE
) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in system.MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", script, mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**clean, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_tune_malloc_keeps_request_sized_buffers_in_the_heap() -> None:
    """A 3 MiB buffer freed and allocated again: with glibc's starting thresholds the second
    one lands in fresh pages (the first was a mapping of its own; the freed mapping moved the
    threshold, so the second comes from newly grown heap), after tune_malloc it reuses the
    first one's pages. An operator's MALLOC_* environment is left alone."""
    untuned = _malloc_probe("plain")
    if untuned["second"] < 500:  # type: ignore[operator]
        pytest.skip(f"this C library's malloc does not behave like glibc's: {untuned}")
    tuned = _malloc_probe("tune")
    assert tuned["said"] == "mmap threshold 4 MiB, trim threshold 4 MiB"
    assert tuned["second"] < 100, tuned  # type: ignore[operator]
    env = _malloc_probe("tune", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert env["said"] == "thresholds left to the environment"
