import json

import numpy as np
import pytest

from psctl.errors import ModelFileError
from psctl.modelfile import load_model, save_model


def test_round_trip(tmp_path):
    path = str(tmp_path / "m.npz")
    save_model(path, {"w": np.arange(3.0)}, {"kind": "logreg", "classes": ["a", "b"]})
    params, meta = load_model(path, expect_kind="logreg")
    np.testing.assert_array_equal(params["w"], [0, 1, 2])
    assert meta["classes"] == ["a", "b"] and meta["format"] == "psctl-model"
    assert not list(tmp_path.glob(".psctl-model-*"))  # no temporary file left behind


def test_errors(tmp_path):
    path = str(tmp_path / "m.npz")
    save_model(path, {"w": np.zeros(2)}, {"kind": "logreg"})
    with pytest.raises(ModelFileError, match="is a logreg model, not mf"):
        load_model(path, expect_kind="mf")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not an .npz archive"):
        load_model(str(tmp_path / "junk.npz"))
    raw = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:-30])
    with pytest.raises(ModelFileError):
        load_model(str(tmp_path / "cut.npz"))
    np.savez(tmp_path / "wrong.npz", __meta__=np.frombuffer(json.dumps({"format": "other"}).encode(), np.uint8))
    with pytest.raises(ModelFileError, match="wrong __meta__ format marker"):
        load_model(str(tmp_path / "wrong.npz"))
    np.savez(tmp_path / "obj.npz", w=np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ModelFileError):
        load_model(str(tmp_path / "obj.npz"))
    with pytest.raises(ValueError):
        save_model(path, {"__meta__": np.zeros(1)}, {"kind": "x"})
