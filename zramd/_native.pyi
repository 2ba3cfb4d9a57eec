from typing import Any

Buffer = bytes | bytearray | memoryview

PAGE: int
LZ4: int
ZSTD: int
LZ4HC: int

def decompress_pages(
    dst: Buffer, items: list[bytes | tuple[int, bytes]], kind: int = 0, /
) -> int: ...
def decode_group(chunks: list[bytes], kind: int, size: int, /) -> bytes | None: ...
def decode_group_into(chunks: list[bytes], kind: int, dst: Buffer, /) -> bool: ...
def new_buffer(n: int, /) -> bytearray: ...
def prepare_pages(
    src: Buffer, kind: int, level: int, threshold: int, same: int, stored: int, huge: int, /
) -> list[tuple[int, int, bytes | None]]: ...
def copy_objects(
    dst: Any, dst_offsets: Any, src: Any, src_offsets: Any, lengths: Any, /
) -> None: ...
