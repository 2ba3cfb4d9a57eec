"""Microbenchmark of the pool's hot path (not a test).

Run: ``python tests/unit/bench_allocator.py [N] [cache_pages]``.

Prefills N objects of about 1.5 KiB (random 1200..1800 B), then times, in CPU time (the machine
is shared), N frees in random order (pool draining: zspages freed and madvised), N stores
(refilling: fresh zspages, page faults), N loads, and N free+store pairs in steady state.
Each phase is repeated REPEATS times; the best is printed, in µs per operation.
"""

from __future__ import annotations

import os
import random
import sys
import time

from zramd.allocator import Pool

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
LOW, HIGH = 1200, 1800
CACHE = int(sys.argv[2]) if len(sys.argv) > 2 else 0
REPEATS = 3


def main() -> None:
    rnd = random.Random(42)
    blob = os.urandom(8192)
    datas = [blob[o : o + n] for o, n in
             ((rnd.randrange(4096), rnd.randint(LOW, HIGH)) for _ in range(1024))]
    pool = Pool(auto_compact=False, cache_pages=CACHE)
    handles = [pool.store(datas[i & 1023]) for i in range(N)]
    order = list(range(N))
    rnd.shuffle(order)
    store = pool.store
    free = pool.free
    load = pool.load
    clock = time.process_time
    best = {"free": 1e9, "store": 1e9, "load": 1e9, "pair": 1e9}
    for _ in range(REPEATS):
        t0 = clock()
        for i in order:
            free(handles[i])
        t1 = clock()
        for i in order:
            handles[i] = store(datas[i & 1023])
        t2 = clock()
        for i in order:
            load(handles[i], 1200)
        t3 = clock()
        for i in order:
            free(handles[i])
            handles[i] = store(datas[i & 1023])
        t4 = clock()
        for k, v in (("free", t1 - t0), ("store", t2 - t1), ("load", t3 - t2),
                     ("pair", t4 - t3)):
            best[k] = min(best[k], 1e6 * v / N)
    print(f"N={N} objects {LOW}..{HIGH} B, pool {pool.total_bytes >> 20} MiB, "
          f"frag {pool.fragmentation():.3f}, metadata {pool.metadata_bytes / N:.1f} B/object")
    print(f"free  {best['free']:.2f} us/op (random order, pool draining)")
    print(f"store {best['store']:.2f} us/op (refilling)")
    print(f"load  {best['load']:.2f} us/op (1200 B)")
    print(f"free+store {best['pair']:.2f} us/pair (steady state)")
    rnd.shuffle(order)  # a new order: victims spread over all zspages
    for i in order[: N * 9 // 10]:
        free(handles[i])
    print(f"before compaction: {pool.total_bytes >> 20} MiB, frag {pool.fragmentation():.3f}")
    t5 = clock()
    freed = pool.compact()
    t6 = clock()
    print(f"compact after freeing 90%: {freed} pages in {1e3 * (t6 - t5):.1f} ms")
    pool.close()
    # incompressible pages: huge-class churn (store new + free old), each a 1-page zspage
    pool = Pool(cache_pages=CACHE)
    page = os.urandom(4096)
    olds = [pool.store(page) for _ in range(1000)]
    t7 = clock()
    for i in range(N):
        j = i % 1000
        new = pool.store(page)
        pool.free(olds[j])
        olds[j] = new
    t8 = clock()
    print(f"huge (4096 B) store+free {1e6 * (t8 - t7) / N:.2f} us/pair, cache_pages={CACHE}")
    pool.close()


if __name__ == "__main__":
    main()
