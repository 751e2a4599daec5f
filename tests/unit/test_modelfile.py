import io
import json
import tracemalloc
import zipfile
from unittest import mock

import numpy as np
import pytest
from numpy.lib import format as npy_format

from psctl.errors import ModelFileError
from psctl.files import modelfile
from psctl.files.modelfile import load_model, save_model


def meta_bytes(meta) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), np.uint8)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.npz"
    save_model(str(path), {"w": np.arange(40.0, dtype=np.float32)}, {"kind": "logreg"})
    return path


def test_round_trip(tmp_path):
    path = str(tmp_path / "m.npz")
    params = {"w": np.arange(3.0), "v": np.ones((2, 3), dtype=np.float32), "n": np.arange(4)}
    save_model(path, params, {"kind": "logreg", "classes": ["a", "b"], "auc": float("nan")})
    loaded, meta = load_model(path, expect_kind="logreg")
    assert loaded.keys() == params.keys()
    for name, array in params.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert meta["classes"] == ["a", "b"] and np.isnan(meta["auc"])
    assert meta["format"] == "psctl-model" and meta["format_version"] == 1
    assert not list(tmp_path.glob(".psctl-model-*"))  # no temporary file left behind


def test_save_replaces_an_existing_file_whole(model_path):
    save_model(str(model_path), {"w": np.zeros(2)}, {"kind": "other"})
    params, meta = load_model(str(model_path))
    assert meta["kind"] == "other" and params["w"].tolist() == [0.0, 0.0]


def test_save_refuses_reserved_names_and_object_arrays(tmp_path):
    path = str(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="may not start with '__'"):
        save_model(path, {"__meta__": np.zeros(1)}, {"kind": "x"})
    with pytest.raises(ValueError, match="object array"):
        save_model(path, {"w": np.array([object()], dtype=object)}, {"kind": "x"})
    assert not list(tmp_path.iterdir())


def test_save_into_a_missing_folder(tmp_path):
    with pytest.raises(ModelFileError, match="cannot write model file '.*m.npz': No such file or directory"):
        save_model(str(tmp_path / "no" / "m.npz"), {"w": np.zeros(1)}, {"kind": "x"})


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelFileError, match="model file '.*none.npz' does not exist$"):
        load_model(str(tmp_path / "none.npz"))
    with pytest.raises(ModelFileError, match="is a folder, not a model file$"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"not a zip at all", b"label,a\n1,2\n"])
def test_not_an_archive(tmp_path, content):
    (tmp_path / "junk.npz").write_bytes(content)
    with pytest.raises(ModelFileError, match=r"'.*junk.npz' is not a psctl model file \(not an .npz archive\)$"):
        load_model(str(tmp_path / "junk.npz"))


def test_a_plain_npy_file_is_not_an_archive(tmp_path):
    np.save(tmp_path / "w.npy", np.zeros(3))
    with pytest.raises(ModelFileError, match="not an .npz archive"):
        load_model(str(tmp_path / "w.npy"))


def test_truncated_archives(tmp_path, model_path):
    raw = model_path.read_bytes()
    for cut in range(4, len(raw), 7):
        (tmp_path / "cut.npz").write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match="is a damaged or truncated .npz archive"):
            load_model(str(tmp_path / "cut.npz"))


def test_corrupted_archive(tmp_path, model_path):
    raw = bytearray(model_path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside the data of w: the CRC check catches it
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"damaged or truncated .npz archive \(BadZipFile\)"):
        load_model(str(tmp_path / "bad.npz"))


def test_numpy_archive_without_meta(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(ModelFileError, match=r"is a numpy archive but not a psctl model \(no __meta__\)$"):
        load_model(str(tmp_path / "plain.npz"))


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (np.frombuffer(b"{not json", np.uint8), "has a __meta__ block that is not JSON text"),
        (np.frombuffer(b"\xff\xfe", np.uint8), "has a __meta__ block that is not JSON text"),
        (np.array('{"format": "psctl-model"}'), "has a __meta__ block that is not JSON text"),
        (meta_bytes(["psctl-model"]), r"is not a psctl model \(wrong __meta__ format marker\)$"),
        (meta_bytes({"format": "other"}), "wrong __meta__ format marker"),
        (meta_bytes({"format": "psctl-model", "format_version": 2, "kind": "logreg"}), "format version 2; this psctl reads 1$"),
        (meta_bytes({"format": "psctl-model", "format_version": 1}), "does not say what kind of model it holds$"),
    ],
)
def test_bad_meta(tmp_path, meta, match):
    np.savez(tmp_path / "m.npz", w=np.zeros(2), __meta__=meta)
    with pytest.raises(ModelFileError, match=match):
        load_model(str(tmp_path / "m.npz"))


def test_object_arrays_are_refused(tmp_path):
    meta = meta_bytes({"format": "psctl-model", "format_version": 1, "kind": "logreg"})
    np.savez(tmp_path / "obj.npz", w=np.array([object()], dtype=object), __meta__=meta, allow_pickle=True)
    with pytest.raises(ModelFileError, match="'.*obj.npz' holds object arrays, which psctl never loads$"):
        load_model(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "objmeta.npz", __meta__=np.array([{"kind": "logreg"}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelFileError, match="holds object arrays"):
        load_model(str(tmp_path / "objmeta.npz"))


def test_non_numeric_parameter(tmp_path):
    meta = meta_bytes({"format": "psctl-model", "format_version": 1, "kind": "logreg"})
    np.savez(tmp_path / "s.npz", w=np.array(["a", "b"]), __meta__=meta)
    with pytest.raises(ModelFileError, match="has a parameter 'w' of type <U1, not numbers$"):
        load_model(str(tmp_path / "s.npz"))


def test_wrong_kind(model_path):
    with pytest.raises(ModelFileError, match="'.*m.npz' is a logreg model, not mf$"):
        load_model(str(model_path), expect_kind="mf")


# --- forged archives: refused before numpy allocates what they declare ----------------
def forge(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


META = meta_bytes({"format": "psctl-model", "format_version": 1, "kind": "logreg"})


@pytest.mark.parametrize(
    ("w", "match"),
    [
        (npy_header((2**27,)) + b"\0" * 64, r"member 'w.npy' declares 1073741824 bytes of data but holds 64$"),
        (npy_header((2**62, 4)) + b"\0" * 8, "declares .* bytes of data but holds 8$"),
        (npy_header((3,)) + b"\0" * 64, "declares 24 bytes of data but holds 64$"),
        (b"label,a\n1,2\n", r"member 'w.npy' that is not a numpy array \("),
        (b"\x93NUMPY\x09\x00" + b"\0" * 16, "not a numpy array .*version"),
        (npy_header((2,), descr="|O") + b"\0" * 16, "holds object arrays, which psctl never loads$"),
    ],
    ids=["huge-shape", "overflowing-shape", "short-shape", "not-npy", "npy-version", "object-header"],
)
def test_forged_members_are_refused_before_loading(tmp_path, w, match):
    forge(tmp_path / "f.npz", {"w.npy": w, "__meta__.npy": npy(META)})
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match=match):
            load_model(str(tmp_path / "f.npz"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_too_many_members(tmp_path):
    forge(tmp_path / "many.npz", {f"w{i}.npy": npy(np.zeros(1)) for i in range(4097)})
    with pytest.raises(ModelFileError, match="has 4097 members; a psctl model has at most 4096$"):
        load_model(str(tmp_path / "many.npz"))


def test_an_archive_larger_than_memory_allows_is_refused(tmp_path, model_path):
    # A compressed member may declare far more than the file's size (a zip bomb).
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", npy(np.zeros(4 << 20, np.uint8)))
        archive.writestr("__meta__.npy", npy(META))
    assert (tmp_path / "bomb.npz").stat().st_size < 64 << 10
    with mock.patch.object(modelfile, "_memory_bytes", return_value=4 << 20):
        with pytest.raises(ModelFileError, match=r"would take 0.0 GiB to load, more than half this machine's memory$"):
            load_model(str(tmp_path / "bomb.npz"))
    params, _ = load_model(str(tmp_path / "bomb.npz"))  # with the real memory size it loads
    assert params["w"].shape == (4 << 20,)


def test_an_encrypted_member_is_a_damaged_archive(tmp_path, model_path):
    raw = bytearray(model_path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while at != -1:  # set the 'encrypted' bit of every central directory entry
        raw[at + 8] |= 1
        at = raw.find(b"PK\x01\x02", at + 1)
    (tmp_path / "enc.npz").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"damaged or truncated .npz archive \(RuntimeError\)$"):
        load_model(str(tmp_path / "enc.npz"))
