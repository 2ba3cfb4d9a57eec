"""Microbenchmark of the pool's hot path (not a test; run: python tests/unit/bench_allocator.py).

Prefills N objects of about 1.5 KiB (random 1200..1800 B), then times N store, N load and N
free in steady state (each free/store pair recycles handles and slots), and prints µs/op.
"""

from __future__ import annotations

import os
import random
import sys
import time

from zramd.allocator import Pool

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
LOW, HIGH = 1200, 1800


def main() -> None:
    rnd = random.Random(42)
    blob = os.urandom(8192)
    datas = [blob[o : o + n] for o, n in
             ((rnd.randrange(4096), rnd.randint(LOW, HIGH)) for _ in range(1024))]
    pool = Pool(auto_compact=False)
    handles = [pool.store(datas[i & 1023]) for i in range(N)]
    order = list(range(N))
    rnd.shuffle(order)
    store = pool.store
    free = pool.free
    load = pool.load

    t0 = time.perf_counter()
    for i in order:
        free(handles[i])
    t1 = time.perf_counter()
    for i in order:
        handles[i] = store(datas[i & 1023])
    t2 = time.perf_counter()
    for i in order:
        load(handles[i], 1200)
    t3 = time.perf_counter()
    # steady-state churn: free one, store one
    for i in order:
        free(handles[i])
        handles[i] = store(datas[i & 1023])
    t4 = time.perf_counter()
    print(f"N={N} objects {LOW}..{HIGH} B, pool {pool.total_bytes >> 20} MiB, "
          f"frag {pool.fragmentation():.3f}, metadata {pool.metadata_bytes / N:.1f} B/object")
    print(f"free  {1e6 * (t1 - t0) / N:.2f} us/op (random order, pool draining)")
    print(f"store {1e6 * (t2 - t1) / N:.2f} us/op (refilling)")
    print(f"load  {1e6 * (t3 - t2) / N:.2f} us/op (1200 B)")
    print(f"free+store pair {1e6 * (t4 - t3) / N:.2f} us/pair (steady state)")
    t5 = time.perf_counter()
    freed = pool.compact()
    t6 = time.perf_counter()
    print(f"compact: {freed} pages in {1e3 * (t6 - t5):.1f} ms")
    pool.close()


if __name__ == "__main__":
    main()
