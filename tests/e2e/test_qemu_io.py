"""qemu-io (qemu-utils) as an NBD client: pattern writes and verified reads, discard, zeroes."""

from __future__ import annotations

import re

from .conftest import MiB, Server, run


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    out = run(args, timeout=60)
    text = out.stdout + out.stderr
    bad = [ln for ln in text.splitlines() if re.search(r"failed|error|mismatch", ln, re.I)]
    assert not bad, f"qemu-io reported errors: {bad}\n{text}"
    return text


def qemu_io_fails(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    out = run(args, timeout=60, check=False)
    assert out.returncode != 0, out.stdout
    return out.stdout + out.stderr


def test_unaligned_pattern_write_and_verified_read(server: Server, transport: bool) -> None:
    uri = server.uri("zram0", unix=transport)
    base = 1 * MiB if transport else 0
    text = qemu_io(
        uri,
        f"write -P 0xab {base + 1536} 70000",
        f"read -P 0xab {base + 1536} 70000",
        f"read -P 0 {base} 1536",                 # the neighbours are still zero
        f"read -P 0 {base + 1536 + 70000} 8192",
    )
    assert f"wrote 70000/70000 bytes at offset {base + 1536}" in text
    assert f"read 70000/70000 bytes at offset {base + 1536}" in text
    # A wrong pattern must be caught (proves the verify really verifies).
    bad = qemu_io_fails(uri, f"read -P 0xac {base + 1536} 70000")
    assert "Pattern verification failed" in bad


def test_overwrite_parts_of_a_page(server: Server) -> None:
    uri = server.uri("zram0")
    base = 3 * MiB
    qemu_io(
        uri,
        f"write -P 0x11 {base} 12288",
        f"write -P 0x22 {base + 100} 1",
        f"write -P 0x33 {base + 4095} 2",
        f"read -P 0x11 {base} 100",
        f"read -P 0x22 {base + 100} 1",
        f"read -P 0x11 {base + 101} {4095 - 101}",
        f"read -P 0x33 {base + 4095} 2",
        f"read -P 0x11 {base + 4097} {12288 - 4097}",
    )


def test_discard_and_write_zeroes(server: Server, transport: bool) -> None:
    uri = server.uri("zram0", unix=transport)
    base = 8 * MiB + (4 * MiB if transport else 0)
    qemu_io(
        uri,
        f"write -P 0x5c {base} 4M",
        f"discard {base} 512k",
        f"read -P 0 {base} 512k",
        f"read -P 0x5c {base + 512 * 1024} 512k",
        f"write -z {base + 1 * MiB} 1M",            # WRITE_ZEROES with NO_HOLE
        f"read -P 0 {base + 1 * MiB} 1M",
        f"write -z -u {base + 2 * MiB} 1M",         # WRITE_ZEROES that may punch a hole
        f"read -P 0 {base + 2 * MiB} 1M",
        f"write -z -n {base + 3 * MiB} 1M",         # FAST_ZERO
        f"read -P 0 {base + 3 * MiB} 1M",
        f"write -z {base + 3 * MiB + 4095} 3",      # unaligned zeroes inside data
        f"read -P 0x5c {base + 512 * 1024} 512k",
    )


def test_discard_unaligned_keeps_neighbours(server: Server) -> None:
    uri = server.uri("zram0")
    base = 20 * MiB
    qemu_io(
        uri,
        f"write -P 0x99 {base} 64k",
        f"discard {base + 512} 1024",   # smaller than a page: may be ignored, must not spread
        f"read -P 0x99 {base} 512",
        f"read -P 0x99 {base + 1536} {64 * 1024 - 1536}",
    )


def test_fua_flush_aio_and_map(server: Server, transport: bool) -> None:
    uri = server.uri("zram0", unix=transport)
    base = 24 * MiB + (2 * MiB if transport else 0)
    text = qemu_io(
        uri,
        f"write -f -P 0x42 {base} 64k",             # FUA
        "flush",
        f"aio_write -P 0x11 {base + 1 * MiB} 4k",
        f"aio_write -P 0x12 {base + 1 * MiB + 4096} 4k",
        "aio_flush",
        f"read -P 0x42 {base} 64k",
        f"read -P 0x11 {base + 1 * MiB} 4k",
        f"read -P 0x12 {base + 1 * MiB + 4096} 4k",
        f"read -v {base + 1 * MiB} 16",
        "map",
    )
    assert re.search(r"11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11", text), text
    # `map` must account for the whole export.
    total = 0
    for m in re.finditer(r"\((0x[0-9a-f]+)\) bytes\s+(?:not )?allocated at offset", text):
        total += int(m.group(1), 16)
    assert total == server.size("zram0"), text


def test_write_past_end_fails(server: Server) -> None:
    size = server.size("zram0")
    text = qemu_io_fails(server.uri("zram0"), f"write -P 0x1 {size - 512} 4096")
    assert "failed" in text


def test_read_only_export_refuses_writes(server: Server) -> None:
    server.require_multi_export()
    uri = server.uri("ro")
    # Opened read-write, qemu sees the READ_ONLY flag and refuses.
    text = qemu_io_fails(uri, "write -P 0x1 0 4k")
    assert "Permission denied" in text or "read-only" in text.lower(), text
    out = run(["qemu-io", "-f", "raw", "-r", uri, "-c", "read -P 0 0 64k"], timeout=60)
    assert "read 65536/65536" in out.stdout
