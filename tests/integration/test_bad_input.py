"""Every bad input gets one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import io
import os
import socket
import time
import zipfile

import numpy as np
import pytest

from ..conftest import EXAMPLES, run_psctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TRAIN = EXAMPLES / "breast_cancer" / "train.csv"
TEST = EXAMPLES / "breast_cancer" / "test.csv"


def assert_clean_error(result, *fragments: str, code: int | None = None):
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = " ".join(result.stderr.split())  # rich may wrap long lines
    assert message.startswith("psctl: error:"), result.stderr
    for fragment in fragments:
        assert fragment in message, result.stderr


def train(*args: str):
    return run_psctl("train", "logreg", *args, "--workers", "2", "--epochs", "1")


def test_missing_file(tmp_path):
    assert_clean_error(train(str(tmp_path / "nope.csv")), "does not exist", code=2)


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    assert_clean_error(train(str(tmp_path / "e.csv")), "is empty", code=2)


def test_header_only(tmp_path):
    (tmp_path / "h.csv").write_text("label,a,b\n")
    assert_clean_error(train(str(tmp_path / "h.csv")), "has no data rows", code=2)


def test_label_column_missing():
    assert_clean_error(train(str(TRAIN), "--label", "diagnosis"), "label column 'diagnosis' is not in", code=2)


def test_non_numeric_cell_names_line_and_column(tmp_path):
    lines = TRAIN.read_text().splitlines()
    cells = lines[40].split(",")
    cells[3] = "abc"
    lines[40] = ",".join(cells)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    header = lines[0].split(",")
    assert_clean_error(train(str(tmp_path / "bad.csv")), "line 41", f"column '{header[3]}'", "'abc' is not a number")


def test_more_than_two_labels(tmp_path):
    rows = ["label,x"] + [f"{i % 3},{i}" for i in range(30)]
    (tmp_path / "three.csv").write_text("\n".join(rows) + "\n")
    assert_clean_error(train(str(tmp_path / "three.csv")), "exactly two label values; found 3")


def test_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_clean_error(train(str(TRAIN), "--server", f"127.0.0.1:{port}"), "cannot reach psctl server", code=3)


def test_bad_server_address():
    assert_clean_error(train(str(TRAIN), "--server", "nowhere"), "not an address of the form HOST:PORT")


def test_bad_mode():
    assert_clean_error(train(str(TRAIN), "--mode", "bsp"), "unknown mode 'bsp'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint-every", "5x"], "--checkpoint-every takes a number of steps (200) or of seconds (30s, 5m); got '5x'"),
        (["--checkpoint-every", "-3"], "--checkpoint-every takes a number of steps"),
        (["--checkpoint-every", "30s"], "--checkpoint-every needs --checkpoint-dir"),
    ],
)
def test_bad_checkpoint_schedule(args, message):
    assert_clean_error(train(str(TRAIN), *args), message)


def test_unknown_model():
    assert_clean_error(run_psctl("train", "forest", str(TRAIN)), "unknown model 'forest'")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.npz"
    r = run_psctl("train", "logreg", str(TRAIN), "--workers", "2", "--epochs", "2", "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path


def test_predict_model_not_psctl(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip at all")
    assert_clean_error(run_psctl("predict", str(tmp_path / "x.npz"), str(TEST)), "not a psctl model file", code=2)


def test_predict_plain_numpy_archive(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    assert_clean_error(run_psctl("predict", str(tmp_path / "plain.npz"), str(TEST)), "not a psctl model", code=2)


def test_predict_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", __meta__=np.array([{"kind": "logreg"}], dtype=object), allow_pickle=True)
    assert_clean_error(run_psctl("predict", str(tmp_path / "obj.npz"), str(TEST)), "object arrays", code=2)


def test_predict_on_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "m.npz")
    started = time.monotonic()
    r = run_psctl("predict", str(tmp_path / "m.npz"), str(TEST), timeout_s=30)
    assert_clean_error(r, "is not a regular file", code=2)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.monotonic() - started < 30


def test_predict_truncated_model(tmp_path, model):
    raw = model.read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    r = run_psctl("predict", str(tmp_path / "t.npz"), str(TEST))
    assert_clean_error(r, code=2)


def test_predict_columns_do_not_match(tmp_path, model):
    (tmp_path / "other.csv").write_text("label,a,b\n1,2,3\n")
    assert_clean_error(run_psctl("predict", str(model), str(tmp_path / "other.csv")), "lacks 30 column(s)", code=2)


def test_predict_missing_data_file(tmp_path, model):
    assert_clean_error(run_psctl("predict", str(model), str(tmp_path / "no.csv")), "does not exist", code=2)


def test_predict_without_labels_still_predicts(tmp_path, model):
    header, *rows = TEST.read_text().splitlines()
    (tmp_path / "nolabel.csv").write_text("\n".join(",".join(ln.split(",")[1:]) for ln in [header, *rows]) + "\n")
    r = run_psctl("predict", str(model), str(tmp_path / "nolabel.csv"), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    assert "113 rows predicted" in r.stdout
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 114


def test_a_diverging_run_stops_with_one_sentence():
    r = run_psctl("train", "linreg", str(TRAIN), "--workers", "2", "--epochs", "3", "--lr", "1e30")
    assert_clean_error(r, "training diverged; try a smaller --lr", code=4)


def test_a_ten_megabyte_line(tmp_path, model):
    lines = TRAIN.read_text().splitlines()
    lines[5] = "1," + "7" * (10 << 20)
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    assert_clean_error(train(str(tmp_path / "long.csv")), "line 6 is longer than 4 MiB", code=2)
    r = run_psctl("predict", str(model), str(tmp_path / "long.csv"))
    assert_clean_error(r, "line 6 is longer than 4 MiB", code=2)


def test_predict_forged_array_header(tmp_path, model):
    # Give w's .npy a header declaring a 1 GiB array; the archive itself stays well formed.
    with zipfile.ZipFile(model) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    w = members["w.npy"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)})
    members["w.npy"] = header.getvalue() + w[w.index(b"\n") + 1 :]
    with zipfile.ZipFile(tmp_path / "forged.npz", "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    r = run_psctl("predict", str(tmp_path / "forged.npz"), str(TEST))
    assert_clean_error(r, "is damaged or forged: member 'w.npy' declares 1073741824 bytes", code=2)


@pytest.mark.parametrize("command", [["server", "--shards", "1"], ["coordinator"]])
@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_a_server_failure_timeout_that_is_not_positive_is_one_sentence(command, value):
    r = run_psctl(*command, "--failure-timeout-s", value, timeout_s=60)
    assert_clean_error(r, "--failure-timeout-s must be a positive number of seconds")
    assert r.returncode == 2
