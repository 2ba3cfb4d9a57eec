"""zramd: userspace zram. Compressed RAM block devices served over the NBD protocol."""

__version__ = "0.1.0"
