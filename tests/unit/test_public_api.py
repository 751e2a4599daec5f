"""What a user imports, the one table of security options, results as JSON, and the docs' paths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import psctl
from psctl import errors
from psctl.apps.results import json_safe
from psctl.apps.train import TrainConfig
from psctl.cluster import child
from psctl.cluster.options import SECURITY_OPTIONS, build_security, security_args
from psctl.net import Security, TlsConfig

REPO = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves():
    for name in psctl.__all__:
        assert getattr(psctl, name) is not None, name
    assert psctl.Job.__module__ == "psctl.apps.api" and psctl.train.__module__ == "psctl.apps.train"
    with pytest.raises(AttributeError):
        psctl.nothing_like_this  # noqa: B018


def test_import_psctl_stays_cheap():
    """Every child process imports psctl: the library parts load on first use only."""
    code = "import sys, psctl; print(sorted(m for m in sys.modules if m.startswith('psctl.')))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       timeout=60).stdout.replace("'", '"'))  # fmt: skip
    assert loaded == ["psctl.errors"]


def test_child_flags_carry_every_security_setting():
    security = Security(
        tls=TlsConfig("c.pem", "k.pem", "ca.pem"), insecure=True, handshake_timeout_s=2.5, idle_timeout_s=7.0,
        max_connections=9, max_keys_per_request=99,
    )
    args = child.parser().parse_args(["worker", "--server", "h:1", *security_args(security)])
    assert child.security_from_args(args) == security
    defaults = child.parser().parse_args(["shard", "--coordinator", "h:1"])
    assert child.security_from_args(defaults) == build_security(secret_file=None) == Security()


def test_one_flag_per_option():
    flags = [o.flag for o in SECURITY_OPTIONS]
    assert len(set(flags)) == len(flags) and all(o.flag == "--" + o.name.replace("_", "-") for o in SECURITY_OPTIONS)
    with pytest.raises(TypeError):
        build_security(secret_fil="x")


def test_json_safe_gives_strict_json():
    value = {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), 1: (np.int64(2), float("inf"))}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == {"a": 0.5, "b": [0, 1, 2], "c": None, "1": [2, None]}


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        ({"local_workers": 1}, "--local-workers is for a job on a running server"),
        ({"staleness": 2}, "--staleness is the bound of --mode ssp; --mode sync has staleness 0"),
        ({"mode": "async", "staleness": 1}, "--mode async has none"),
        ({"model_params": {"huber_delta": 1.0}}, "--huber-delta is for --loss huber"),
        ({"resume": "a", "checkpoint_dir": "b"}, "--resume continues in its own folder"),
    ],
)
def test_contradicting_options_are_usage_errors(changes, sentence):
    with pytest.raises(errors.UsageError, match=re.escape(sentence)) as caught:
        TrainConfig(model="logreg", data="d.csv", **changes).check()
    assert caught.value.exit_code == 2


def test_the_options_that_go_together_pass():
    TrainConfig(model="logreg", data="d.csv", mode="ssp", staleness=2, server="h:1", local_workers=0).check()
    TrainConfig(model="linreg", data="d.csv", model_params={"loss": "huber", "huber_delta": 1.0}).check()
    TrainConfig(model="logreg", data="d.csv", resume="a", checkpoint_dir="a/").check()


def _documented_paths() -> list[tuple[str, str]]:
    docs = [REPO / "README.md", REPO / "examples" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = []
    for doc in docs:
        for path in re.findall(r"\bpsctl/[\w/.]*\w", doc.read_text()):
            found.append((doc.name, path))
    return found


def test_every_psctl_path_in_the_docs_exists():
    missing = [f"{doc}: {path}" for doc, path in _documented_paths() if not (REPO / path).exists()]
    assert not missing, missing
    assert len(_documented_paths()) > 10  # the scan does find the module table


def test_readme_exit_codes_match_the_errors():
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|", readme.split("## Exit codes", 1)[1], flags=re.M))
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.PsctlError)}
    assert codes <= {int(c) for c in table}, (codes, table)
    assert {0, 2, 130} <= {int(c) for c in table}
