#!/usr/bin/env python3
"""Relay one guest connection (stdin/stdout) to the host zramd on 127.0.0.1:PORT.

Theory of operation
-------------------
qemu's restricted user network has exactly one way out, ``guestfwd=tcp:10.0.2.100:10809-cmd:...``:
for each TCP connection the guest opens to 10.0.2.100:10809, qemu spawns this program with the
connection on stdin/stdout. We connect to the host server on loopback (never any other address)
and copy bytes both ways with one thread per direction: a single-threaded copy stalls when both
sides write at once (swap traffic fills both directions). EOF in one direction is passed on as a
half-close (shutdown SHUT_WR / closing stdout); the process exits when both directions ended.

Usage: relay.py PORT [LOGFILE]   (LOGFILE gets one line per connection: open and close, bytes)
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
BUFSIZE = 1 << 18
CONNECT_TIMEOUT_S = 10.0


def main() -> int:
    port = int(sys.argv[1])
    logfile = sys.argv[2] if len(sys.argv) > 2 else None
    sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    counts = {"up": 0, "down": 0}
    t0 = time.monotonic()

    def note(text: str) -> None:
        if logfile:
            with open(logfile, "a") as f:
                f.write(f"{time.time():.3f} pid={os.getpid()} {text}\n")

    note(f"open port={port}")

    def up() -> None:  # guest -> server
        try:
            while True:
                data = os.read(0, BUFSIZE)
                if not data:
                    break
                sock.sendall(data)
                counts["up"] += len(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def down() -> None:  # server -> guest
        try:
            while True:
                data = sock.recv(BUFSIZE)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    n = os.write(1, view)
                    view = view[n:]
                counts["down"] += len(data)
        except OSError:
            pass
        try:
            os.close(1)
        except OSError:
            pass

    threads = [threading.Thread(target=up, daemon=True), threading.Thread(target=down, daemon=True)]
    for t in threads:
        t.start()
    # The guest closing its side ends "up"; the server then closes and "down" ends. If the server
    # goes away first, "down" ends and stdin may never see EOF: don't wait for "up" forever.
    threads[1].join()
    threads[0].join(timeout=2.0)
    note(f"close up={counts['up']} down={counts['down']} secs={time.monotonic() - t0:.1f}")
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
