"""psctl.data.idx: IDX files (MNIST's format), plain and gzip, and the bad ones as one sentence."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from psctl.data.idx import parse_idx
from psctl.errors import DataError


def _idx(array: np.ndarray, type_byte: int, dtype: str) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, type_byte, array.ndim]) + dims + array.astype(dtype).tobytes()


def test_uint8_images_and_big_endian_ints_plain_and_gzip():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    for raw, want in ((_idx(images, 0x08, ">u1"), images), (_idx(ints, 0x0C, ">i4"), ints)):
        for data in (raw, gzip.compress(raw)):
            got = parse_idx(data)
            np.testing.assert_array_equal(got, want)
            assert got.dtype.isnative


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),  # no such type
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "holds 2 bytes of values; its header"),  # one byte short
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "holds 2 bytes of values"),  # trailing byte
    ],
)
def test_a_bad_file_is_one_sentence(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw)
