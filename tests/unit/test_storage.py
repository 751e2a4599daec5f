"""Input bytes from compressed files, URLs (fsspec's memory://) and other delimiters: the
partitions and rows equal those of the same text as a plain local CSV."""

from __future__ import annotations

import bz2
import gzip
import sys
import uuid

import numpy as np
import pytest

from psctl.data import csvfile, formats, storage
from psctl.errors import DataError, ModelFileError, UsageError
from psctl.files import modelfile

from ..conftest import write_logreg_csv

pytestmark = pytest.mark.timeout(60)
zstandard = pytest.importorskip("zstandard")
fsspec = pytest.importorskip("fsspec")

COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b)}


@pytest.fixture
def plain(tmp_path):
    path = write_logreg_csv(tmp_path / "d.csv", rows=203, features=3, seed=1)
    # a blank line and a long line, so byte ranges and line numbers are not trivial
    text = path.read_text().splitlines()
    text.insert(50, "")
    path.write_text("\n".join(text) + "\n")
    return path


def rows_of(path, parts, schema):
    return [csvfile.read_partition(str(path), schema, p) for p in parts]


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_compressed_csv_partitions_and_rows_equal_the_plain_files(tmp_path, plain, suffix):
    packed = tmp_path / f"d.csv.{suffix}"
    packed.write_bytes(COMPRESS[suffix](plain.read_bytes()))
    schema = csvfile.read_schema(str(packed))
    assert schema == csvfile.read_schema(str(plain))
    for n in (1, 3, 8):
        parts = csvfile.plan_partitions(str(packed), n)
        assert parts == csvfile.plan_partitions(str(plain), n)  # ranges of the decompressed text
        for (Xa, ya), (Xb, yb) in zip(rows_of(packed, parts, schema), rows_of(plain, parts, schema)):
            np.testing.assert_array_equal(Xa, Xb)
            np.testing.assert_array_equal(ya, yb)


def test_a_forward_seek_of_a_compressed_stream_decompresses_to_there(tmp_path):
    text = b"".join(b"%06d\n" % i for i in range(100_000))
    path = tmp_path / "n.txt.gz"
    path.write_bytes(gzip.compress(text))
    with storage.open_input(str(path)) as fh:
        assert fh.readline() == b"000000\n"
        fh.seek(7 * 5000)
        assert fh.read(7) == b"005000\n" and fh.tell() == 7 * 5001
        fh.seek(7)  # back: from the start again
        assert fh.read(7) == b"000001\n"
    assert storage.read_range(str(path), 7 * 99_999, 7 * 100_000) == b"099999\n"
    assert storage.text_size(str(path)) == len(text)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("bad.csv.gz", b"label,a\n1,2\n", "damaged or not gzip-compressed"),  # not gzip at all
        ("cut.csv.gz", (lambda z: z[: len(z) // 2])(gzip.compress(b"label,a\n" + b"".join(b"1,%d\n" % i for i in range(9000)))),
         "damaged or not gzip-compressed"),
        ("bad.csv.bz2", b"BZh9garbage", "damaged or not bz2-compressed"),
        ("bad.csv.zst", b"\x28\xb5\x2f\xfd garbage", "damaged or not zstd-compressed"),
    ],
)
def test_a_damaged_compressed_file_is_one_sentence(tmp_path, name, data, fragment):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=fragment):
        csvfile.plan_partitions(str(path), 2)


def test_a_corrupt_gzip_block_is_found_when_read(tmp_path, plain):
    packed = bytearray(gzip.compress(plain.read_bytes()))
    packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / "flip.csv.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(DataError, match="damaged or not gzip-compressed"):
        csvfile.plan_partitions(str(path), 2)


@pytest.mark.parametrize(("given", "sep"), [("tab", "\t"), ("\\t", "\t"), ("\t", "\t"), (";", ";"), ("|", "|"), (None, ",")])
def test_delimiter_rows_equal_the_comma_files(tmp_path, plain, given, sep):
    other = tmp_path / "d.sep"
    other.write_text(plain.read_text().replace(",", sep))
    assert csvfile.check_delimiter(given) == sep
    schema = csvfile.read_schema(str(other), delimiter=sep)
    assert schema.delimiter == sep and schema.columns == csvfile.read_schema(str(plain)).columns
    assert csvfile.CsvSchema.from_dict(schema.to_dict()) == schema
    parts = csvfile.plan_partitions(str(other), 4)
    assert parts == csvfile.plan_partitions(str(plain), 4)  # one byte for one byte
    for (Xa, ya), (Xb, yb) in zip(rows_of(other, parts, schema), rows_of(plain, parts, csvfile.read_schema(str(plain)))):
        np.testing.assert_array_equal(Xa, Xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("bad", ["ab", '"', "\n", "é", ""])
def test_a_delimiter_psctl_cannot_split_on_is_refused(bad):
    with pytest.raises(DataError, match="--delimiter must be one ASCII character"):
        csvfile.check_delimiter(bad)


def test_hashed_csv_with_a_delimiter_hashes_the_same_keys(tmp_path):
    comma = tmp_path / "c.csv"
    comma.write_text("label,city,x\n1,paris,0.5\n0,rome,1.5\n1,oslo,2\n")
    tab = tmp_path / "c.tsv"
    tab.write_text(comma.read_text().replace(",", "\t"))
    a = formats.plan_source(str(comma), categorical=["city"], hash_bits=10)
    b = formats.plan_source(str(tab), categorical=["city"], hash_bits=10, delimiter="\t")
    [pa] = csvfile.plan_partitions(str(comma), 1)
    [pb] = csvfile.plan_partitions(str(tab), 1)
    Xa, ya = formats.read_partition(a.data, str(comma), pa)
    Xb, yb = formats.read_partition(b.data, str(tab), pb)
    np.testing.assert_array_equal(Xa.indices, Xb.indices)
    np.testing.assert_array_equal(Xa.values, Xb.values)
    np.testing.assert_array_equal(ya, yb)


@pytest.fixture
def memory_url():
    root = f"memory://psctl-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_a_url_reads_as_the_local_file(plain, memory_url):
    url = f"{memory_url}/d.csv"
    with fsspec.open(url, "wb") as fh:
        fh.write(plain.read_bytes())
    assert storage.is_url(url) and storage.absolute(url) == url
    assert storage.stored_size(url) == plain.stat().st_size
    schema = csvfile.read_schema(url)
    parts = csvfile.plan_partitions(url, 5)
    assert parts == csvfile.plan_partitions(str(plain), 5)
    for (Xa, ya), (Xb, yb) in zip(rows_of(url, parts, schema), rows_of(plain, parts, schema)):
        np.testing.assert_array_equal(Xa, Xb)
        np.testing.assert_array_equal(ya, yb)


def test_a_url_reads_only_the_byte_range_asked_for(plain, memory_url, monkeypatch):
    url = f"{memory_url}/d.csv"
    with fsspec.open(url, "wb") as fh:
        fh.write(plain.read_bytes())
    fs = fsspec.filesystem("memory")
    asked = []
    real = type(fs).cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        asked.append((start, end))
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(fs), "cat_file", cat_file)
    part = csvfile.plan_partitions(url, 4)[2]
    csvfile.read_partition(url, csvfile.read_schema(url), part)
    assert asked == [(part.start, part.end)]


def test_a_missing_url_is_one_sentence(memory_url):
    with pytest.raises(DataError, match="does not exist"):
        csvfile.read_schema(f"{memory_url}/nothing.csv")


def test_model_files_round_trip_through_a_url(memory_url, tmp_path):
    params = {"w": np.arange(5, dtype=np.float32)}
    url = f"{memory_url}/models/m.npz"
    modelfile.save_model(url, params, {"kind": "logreg"})
    got, meta = modelfile.load_model(url)
    np.testing.assert_array_equal(got["w"], params["w"])
    assert meta["kind"] == "logreg"
    with pytest.raises(ModelFileError, match="does not exist"):
        modelfile.load_model(f"{memory_url}/models/none.npz")


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("zstandard", lambda p: csvfile.read_schema(str(p / "d.csv.zst")), "pip install 'psctl[zstd]'"),
        ("fsspec", lambda p: csvfile.read_schema("s3://bucket/d.csv"), "pip install 'psctl[s3]'"),
        ("s3fs", lambda p: csvfile.read_schema("s3://bucket/d.csv"), "pip install 'psctl[s3]'"),
    ],
)
def test_a_missing_extra_names_its_pip_install(tmp_path, monkeypatch, module, call, extra):
    (tmp_path / "d.csv.zst").write_bytes(COMPRESS["zst"](b"a,b\n1,2\n"))
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(UsageError, match=f"needs {module}, which is not installed; run: {extra}".replace("[", r"\[").replace("]", r"\]")):
        call(tmp_path)


def test_ranges_read_in_order_decompress_the_file_once(tmp_path, monkeypatch):
    text = b"".join(b"%06d\n" % i for i in range(50_000))
    path = tmp_path / "n.txt.gz"
    path.write_bytes(gzip.compress(text))
    opened = []
    real = storage.open_stored
    monkeypatch.setattr(storage, "open_stored", lambda p, *a: opened.append(p) or real(p, *a))
    step = 7 * 5000
    pieces = [storage.read_range(str(path), a, a + step) for a in range(0, len(text), step)]
    assert b"".join(pieces) == text and len(opened) == 1
    assert storage.read_range(str(path), 0, 7) == b"000000\n" and len(opened) == 2  # back: opened again
