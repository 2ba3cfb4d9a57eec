"""Benchmark harness: zramd against its peers, one command (``python -m zramd.bench``).

Theory of operation
-------------------
The harness is an instrument, not part of the server: it starts each NBD server under test as a
separate process on a Unix socket in a private temp dir (``servers``), drives it with real clients
(fio's nbd engine for the workloads in ``fio``, nbdcopy for the real-data images in ``density``),
samples the server's CPU and RSS from /proc, and writes medians and ratios zramd / peer
(``report``) to ``docs/benchmarks/``. ``micro`` times the hot parts of zramd in-process.

Every server is started fresh for every workload sample and servers are interleaved within each
repetition, so a slow moment of a shared machine hits all of them alike. The harness imports
zramd's own modules only in ``micro`` (lazily) and for the codecs behind the ideal-size column; it
talks to the zramd server only through its command line and NBD.
"""
