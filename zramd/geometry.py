"""Page geometry: the unit zramd counts memory in.

Theory of operation
-------------------
As in zram, one page size serves three roles: a device is an array of pages (the page table has
one entry per page), the pool builds its zspages from pages and reports its memory in them, and
the counters report data in pages (``orig_data_size`` is ``pages_stored * PAGE_SIZE``). The
kernel has one ``PAGE_SIZE`` for all three; zramd defines it here once, in the bottom layer, so
that the allocator, the counters, the device and the configuration (export sizes are whole
pages) share it without importing one another. Imports nothing.
"""

#: log2 of the page size
PAGE_SHIFT = 12
#: bytes per page: the unit of the page table, the pool's zspages and the page counters
PAGE_SIZE = 1 << PAGE_SHIFT
