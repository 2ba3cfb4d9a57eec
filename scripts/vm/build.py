#!/usr/bin/env python3
"""Build the guest of the zramd VM test: a Debian kernel and an initramfs, cached.

Theory of operation
-------------------
Inputs are Debian packages fetched with ``apt-get download`` (never installed on the host), the
init script and memhog.c beside this file, and the host's shared libraries (the host is Debian 12
too; each guest binary's libraries are found with ``ldd`` on the extracted binary and copied).

Cache layout under ``.cache/vm`` (ignored by git):

  debs/          the .deb files; ``debs/manifest.json`` lists the resolved file names, keyed on
                 the package list below. A warm build never calls apt.
  x/NAME/        each package unpacked with ``dpkg-deb -x``
  out/KEY/       ``vmlinuz`` and ``initrd.gz``; KEY hashes every input (this file, init.sh,
                 memhog.c, the .deb names, the gcc version). An existing KEY is reused as is.

The initramfs is written by :func:`write_cpio` (newc, deterministic: sorted, mtime 0, uid 0), so
``/dev/console`` exists without mknod and the same inputs give the same bytes.

Must not know: which scenarios exist or what they check (that is init.sh and the harness).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE = REPO / ".cache" / "vm"

KERNEL_META = "linux-image-amd64"
PACKAGES = ["busybox-static", "nbd-client", "e2fsprogs", "util-linux", "mount", "mdadm"]
MANIFEST_VERSION = 1

# guest path -> (package, path inside the package)
BINARIES = {
    "sbin/nbd-client": ("nbd-client", "sbin/nbd-client"),
    "sbin/mke2fs": ("e2fsprogs", "sbin/mke2fs"),
    "sbin/e2fsck": ("e2fsprogs", "sbin/e2fsck"),
    "sbin/mkswap": ("util-linux", "sbin/mkswap"),
    "sbin/fstrim": ("util-linux", "sbin/fstrim"),
    "sbin/blkdiscard": ("util-linux", "sbin/blkdiscard"),
    "sbin/swapon": ("mount", "sbin/swapon"),
    "sbin/swapoff": ("mount", "sbin/swapoff"),
    "sbin/mdadm": ("mdadm", "sbin/mdadm"),
}
SYMLINKS = {"sbin/mkfs.ext2": "mke2fs", "sbin/fsck.ext2": "e2fsck"}
# modules the guest loads; their dependencies are added from each .ko's modinfo
MODULES = ["virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4", "raid0", "raid1"]
BUSYBOX_SKIP = {"mkswap", "swapon", "swapoff", "fstrim", "blkdiscard", "mke2fs", "e2fsck",
                "mkfs.ext2", "fsck.ext2", "nbd-client", "mdadm", "init", "linuxrc"}


def log(msg: str) -> None:
    print(f"[vm-build] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, cwd=cwd).stdout


def resolve_kernel_package() -> str:
    try:
        out = run(["apt-cache", "depends", KERNEL_META])
    except subprocess.CalledProcessError:  # a fresh machine may have no package lists yet
        log("apt-cache knows no kernel package: apt-get update")
        run(["apt-get", "update", "-q"])
        out = run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise RuntimeError(f"cannot resolve the kernel package behind {KERNEL_META}:\n{out}")
    return m.group(1)


def fetch_debs(cache: Path, refresh: bool) -> dict[str, Path]:
    """Return package name -> .deb path, downloading only when the manifest is missing."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    manifest = debs / "manifest.json"
    want_key = {"version": MANIFEST_VERSION, "packages": PACKAGES, "kernel": KERNEL_META}
    if manifest.exists() and not refresh:
        data = json.loads(manifest.read_text())
        if data.get("key") == want_key and all((debs / f).exists() for f in data["files"].values()):
            return {name: debs / f for name, f in data["files"].items()}
    kernel = resolve_kernel_package()
    names = [kernel, *PACKAGES]
    log(f"apt-get download {' '.join(names)}")
    before = set(os.listdir(debs))
    # apt drops privileges to _apt for downloads; a root-owned cache dir only warns.
    subprocess.run(["apt-get", "download", *names], cwd=debs, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    files: dict[str, str] = {}
    for name in names:
        cands = sorted(f for f in os.listdir(debs)
                       if f.startswith(name + "_") and f.endswith(".deb"))
        fresh = [f for f in cands if f not in before] or cands
        if not fresh:
            raise RuntimeError(f"apt-get download gave no .deb for {name}")
        files["kernel" if name == kernel else name] = fresh[-1]
    manifest.write_text(json.dumps({"key": want_key, "files": files}, indent=1))
    return {name: debs / f for name, f in files.items()}


def extract(cache: Path, deb: Path) -> Path:
    dest = cache / "x" / deb.stem
    if not (dest / ".done").exists():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(dest)])
        (dest / ".done").touch()
    return dest


def shared_libs(binary: Path) -> list[Path]:
    out = run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise RuntimeError(f"{binary}: {line} (install the library on the host)")
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def module_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")


def module_order(moddir: Path) -> list[Path]:
    """Modules in load order (dependencies first)."""
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            raise RuntimeError(f"module {name} not found under {moddir}")
        for dep in module_depends(index[key]):
            visit(dep)
        order.append(index[key])

    for mod in MODULES:
        visit(mod)
    return order


def input_key(debs: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for f in ("build.py", "init.sh", "memhog.c"):
        h.update((HERE / f).read_bytes())
    for name in sorted(debs):
        h.update(f"{name}={debs[name].name}\n".encode())
    h.update(run(["gcc", "--version"]).encode())
    return h.hexdigest()[:16]


def write_cpio(root: Path, out: Path) -> None:
    """Write ``root`` as a gzip'd newc cpio archive, plus /dev/console, deterministically."""
    entries: list[tuple[str, int, bytes, int, int]] = []  # name, mode, data, rdevmajor, rdevminor
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries.append((rel, stat.S_IFLNK | 0o777, os.readlink(path).encode(), 0, 0))
        elif stat.S_ISDIR(st.st_mode):
            entries.append((rel, stat.S_IFDIR | 0o755, b"", 0, 0))
        else:
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            entries.append((rel, stat.S_IFREG | mode, path.read_bytes(), 0, 0))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries.sort(key=lambda e: e[0])

    def header(ino: int, name: str, mode: int, size: int, maj: int, mnr: int) -> bytes:
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, maj, mnr, len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        blob = hdr + name.encode() + b"\0"
        return blob + b"\0" * (-len(blob) % 4)

    with gzip.GzipFile(out, "wb", compresslevel=6, mtime=0) as gz:
        for ino, (name, mode, data, maj, mnr) in enumerate(entries, start=1):
            gz.write(header(ino, name, mode, len(data), maj, mnr))
            gz.write(data + b"\0" * (-len(data) % 4))
        gz.write(header(0, "TRAILER!!!", 0, 0, 0, 0))


OUTPUTS_KEPT = 3


def prune_outputs(outdir: Path, keep: Path) -> None:
    """Remove all but the newest OUTPUTS_KEPT guest builds (always keeping ``keep``)."""
    builds = sorted(outdir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[OUTPUTS_KEPT:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def build(cache: Path = DEFAULT_CACHE, refresh: bool = False) -> tuple[Path, Path]:
    """Return (vmlinuz, initrd.gz), building them if their inputs changed."""
    debs = fetch_debs(cache, refresh)
    key = input_key(debs)
    out = cache / "out" / key
    kernel_out, initrd_out = out / "vmlinuz", out / "initrd.gz"
    if kernel_out.exists() and initrd_out.exists():
        return kernel_out, initrd_out
    log(f"building guest {key}")
    x = {name: extract(cache, deb) for name, deb in debs.items()}
    tmp = cache / "tmp" / f"{key}-{os.getpid()}"  # concurrent builders do not collide
    if tmp.exists():
        shutil.rmtree(tmp)
    root = tmp / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "proc", "sys", "dev", "tmp",
              "mnt", "etc", "lib/modules", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)

    # busybox and its applets (the static binary runs on the host to list them)
    busybox = x["busybox-static"] / "bin" / "busybox"
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in run([str(busybox), "--list"]).split():
        if applet not in BUSYBOX_SKIP and applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")

    libs: set[Path] = set()
    for dest, (pkg, src) in BINARIES.items():
        path = x[pkg] / src
        shutil.copy2(path, root / dest)
        libs.update(shared_libs(path))
    for link, target in SYMLINKS.items():
        (root / link).symlink_to(target)
    for lib in sorted(libs):
        real = lib.resolve()
        lib_dest = root / lib.relative_to("/")
        lib_dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, lib_dest)

    # kernel and modules
    kx = x["kernel"]
    vmlinuz = next((kx / "boot").glob("vmlinuz-*"))
    moddir = next((kx / "lib" / "modules").iterdir())
    order = module_order(moddir)
    for ko in order:
        data = ko.read_bytes()
        if ko.suffix == ".xz":
            raise RuntimeError(f"{ko}: compressed modules are not handled")
        (root / "lib" / "modules" / ko.name).write_bytes(data)
    (root / "lib" / "modules" / "load-order").write_text("".join(f"{ko.name}\n" for ko in order))

    # memhog and init
    memhog = root / "bin" / "memhog"
    run(["gcc", "-static", "-O2", "-Wall", "-o", str(memhog), str(HERE / "memhog.c")])
    shutil.copy2(HERE / "init.sh", root / "init")
    (root / "init").chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")

    out.mkdir(parents=True, exist_ok=True)
    write_cpio(root, tmp / "initrd.gz")
    shutil.copy2(vmlinuz, tmp / "vmlinuz")
    os.replace(tmp / "initrd.gz", initrd_out)
    os.replace(tmp / "vmlinuz", kernel_out)
    shutil.rmtree(tmp)
    prune_outputs(cache / "out", keep=out)
    log(f"guest ready: {out} ({initrd_out.stat().st_size // 1024} KiB initrd, "
        f"modules: {' '.join(k.name for k in order)})")
    return kernel_out, initrd_out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--refresh", action="store_true", help="re-resolve and re-download packages")
    args = ap.parse_args()
    kernel, initrd = build(args.cache, args.refresh)
    print(kernel)
    print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
