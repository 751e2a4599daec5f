"""An OpenAPI-driven fuzzer (schemathesis) against ``psctl serve``, on loopback.

Run from the repository root, with schemathesis installed where its ``st``
command is found (it is not a psctl dependency: a separate virtualenv is best,
``python -m venv /tmp/st && /tmp/st/bin/pip install schemathesis``):

    python benchmarks/serve_fuzz.py [--st /tmp/st/bin/st] [--seconds 60] [--token]

It trains four small models with ``psctl train`` (logreg, softmax, linreg on
the examples; mf on examples/ratings), serves them with ``psctl serve`` on
127.0.0.1 (with ``--token``: behind a bearer token, which the fuzzer is given),
and runs ``st run URL/openapi.json --checks all`` for the time budget: every
generated request (schema-valid ones must get a 2xx, schema-violating ones a
4xx; no 5xx ever; status codes, content types, Allow headers and response
bodies as the description says). The description names each model's own
paths and columns, so the fuzzer reaches the prediction code, not only the
refusals. At the end it checks that the server is still up and printed no
traceback. Exit code: schemathesis's (0 when every check passed).

Not in the test suite: schemathesis is a large dependency, a useful run takes
a minute, and its own coverage phase sometimes stops with an internal error
(seen with 4.32.5: "AST constructor recursion depth mismatch" in its
generator), which would make the suite flaky for reasons outside psctl.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def train(folder: Path) -> list[str]:
    jobs = {
        "cancer": ["logreg", str(EXAMPLES / "breast_cancer/train.csv"), "--epochs", "3", "--lr", "0.5"],
        "digits": ["softmax", str(EXAMPLES / "digits/train.csv"), "--epochs", "2", "--lr", "0.5"],
        "regression": ["linreg", str(EXAMPLES / "regression/train.csv"), "--label", "target", "--epochs", "3"],
        "mf": ["mf", str(EXAMPLES / "ratings/train.csv"), "--epochs", "3", "--rank", "4", "--lr", "10", "--l2", "0.1"],
    }
    for name, args in jobs.items():
        out = folder / f"{name}.npz"
        subprocess.run([sys.executable, "-m", "psctl", "train", *args, "--workers", "2", "--out", str(out)],
                       check=True, capture_output=True, cwd=REPO, timeout=600)  # fmt: skip
    return [str(folder / f"{name}.npz") for name in jobs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--st", default=shutil.which("st") or "st", help="schemathesis's st command.")
    p.add_argument("--seconds", type=int, default=60, help="The fuzzer's time budget.")
    p.add_argument("--token", action="store_true", help="Serve behind a bearer token (the fuzzer sends it).")
    args = p.parse_args()
    if not Path(args.st).exists() and shutil.which(args.st) is None:
        sys.exit(f"no schemathesis 'st' command at {args.st}; install schemathesis and pass --st PATH")
    with tempfile.TemporaryDirectory() as tmp:
        models = train(Path(tmp))
        extra: list[str] = []
        headers: list[str] = []
        if args.token:
            token = secrets.token_hex(32)
            token_file = Path(tmp) / "token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            extra = ["--token-file", str(token_file)]
            headers = ["-H", f"Authorization: Bearer {token}"]
        served = subprocess.Popen([sys.executable, "-m", "psctl", "serve", *models, "--port", "0", *extra], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            line = served.stdout.readline()
            if "listening on" not in line:
                sys.exit(f"psctl serve did not start: {line}{served.stderr.read()}")
            url = line.split("listening on ", 1)[1].split()[0]
            code = subprocess.run([args.st, "run", f"{url}/openapi.json", "--checks", "all", "--max-time", str(args.seconds),
                                   "--workers", "2", *headers], cwd=tmp, timeout=args.seconds * 5 + 120).returncode  # fmt: skip
            with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as resp:
                assert resp.status == 200, "psctl serve stopped answering"
            print(f"psctl serve still answers after the fuzzer (schemathesis exit code {code})")
        finally:
            served.terminate()
            _, err = served.communicate(timeout=20)
        if "Traceback" in err:
            print(f"psctl serve printed a traceback:\n{err}")
            return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
