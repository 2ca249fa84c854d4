"""CRC32C, the one checksum cloudckpt records and verifies (hardware-accelerated, ~10 GB/s).

CRC32C is what S3 (x-amz-checksum-crc32c) and GCS (object crc32c) speak natively, so one
algorithm serves the manifest, per-part upload checksums and the store's own object checksum.
"""

from __future__ import annotations

import base64

import crc32c as _crc32c

ALGORITHM = "crc32c"


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``value``; accepts any (also writable) buffer."""
    return int(_crc32c.crc32c(data, value))


def crc32c_b64(value: int) -> str:
    """The base64 big-endian form S3 and GCS use in headers and metadata."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def crc32c_from_b64(text: str) -> int:
    return int.from_bytes(base64.b64decode(text), "big")
