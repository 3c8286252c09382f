"""Reading the IDX files MNIST ships in (gzip or plain), without torchvision.

Format: a big-endian 4-byte magic ``0x0000 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes,
then the raw values. MNIST uses dtype 0x08 (uint8): images have magic 2051 (3 dims), labels 2049
(1 dim).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "read_idx", "write_idx"]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UINT8 = 0x08


def read_idx(path: str | Path, magic: int) -> torch.Tensor:
    """The uint8 tensor in IDX file ``path`` (``.gz`` is decompressed), checking ``magic``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if found != magic:
        raise ValueError(
            f"{path} is not an IDX file of the expected kind: magic {found}, expected {magic} "
            f"({IMAGES_MAGIC} = images, {LABELS_MAGIC} = labels); the file may be truncated or "
            "swapped with its partner"
        )
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if body.size != expected:
        raise ValueError(
            f"{path}: header says {list(dims)} ({expected} bytes of values) but the file holds "
            f"{body.size}; the file is truncated or corrupted, fetch it again"
        )
    return torch.from_numpy(body.reshape(dims).copy())


def write_idx(path: str | Path, values: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip when ``path`` ends in ``.gz``); for tests."""
    if values.dtype != torch.uint8:
        raise ValueError(f"write_idx writes uint8 only, got {values.dtype}")
    header = struct.pack(">I", (_UINT8 << 8) | values.dim())
    header += struct.pack(f">{values.dim()}I", *values.shape)
    payload = header + values.contiguous().numpy().tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
