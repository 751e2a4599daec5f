"""IDX files, MNIST's format: two zero bytes, a type byte, the number of dimensions, each
dimension as a big-endian uint32, then the values, big-endian, row-major; gzip or not."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from psctl.errors import DataError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_DIMS = 8
MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def parse_idx(raw: bytes, name: str = "the IDX data") -> np.ndarray:
    """The array an IDX file's bytes hold (gzip's bytes are decompressed first), in native byte order."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _TYPES or not 1 <= raw[3] <= MAX_DIMS:
        raise DataError(f"{name} is not an IDX file (its first four bytes are {raw[:4].hex() or 'missing'})")
    header = 4 + 4 * raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    dtype = np.dtype(_TYPES[raw[2]])
    if len(raw) != header + math.prod(dims) * dtype.itemsize:
        raise DataError(f"{name} holds {len(raw) - header} bytes of values; its header ({'x'.join(map(str, dims))} "
                        f"of {dtype.itemsize} bytes) says {math.prod(dims) * dtype.itemsize}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or not) as an array."""
    return parse_idx(Path(path).read_bytes(), str(path))


def mnist(folder: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST's ``train`` (60,000) or ``test`` (10,000) images as rows of 784 uint8 pixels, and their labels."""
    images, labels = (Path(folder) / f for f in MNIST_FILES[split])
    X, y = read_idx(images), read_idx(labels)
    if len(X) != len(y):
        raise DataError(f"{images} has {len(X)} images but {labels} {len(y)} labels")
    return X.reshape(len(X), -1), y
