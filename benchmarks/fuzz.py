"""The structured fuzzer of tests/fuzzing.py with a larger count.

``python -m benchmarks --only fuzz [--fuzz-frames N]`` (default 50,000; ``--quick`` 10,000):
a clean run of logreg (sync, one worker), then psctl coordinator + psctl shard with a secret,
the same job from ``psctl train --server ... --local-workers 1``, and N hostile frames with
valid headers at both while it trains. Reports frames sent, crashes, parameters changed
(weights that differ from the clean run's) and the shard's RSS growth.
"""

from __future__ import annotations

import os

from benchmarks.common import SectionResult, Settings, Table
from tests.fuzzing import WEIGHT_TOLERANCE, run_structured_fuzz

SEED = int(os.environ.get("PSCTL_FUZZ_SEED", "20261201"))


async def run_fuzz(settings: Settings, frames: int | None = None) -> SectionResult:
    frames = frames or (10_000 if settings.quick else 50_000)
    epochs = max(25, frames // 150)  # the job trains for as long as the frames take, or longer (at ~2,500 frames/s)
    folder = settings.tmp_dir / "fuzz"
    folder.mkdir(parents=True, exist_ok=True)
    r = await run_structured_fuzz(folder, frames, SEED, epochs)
    t = r.tally
    mib = 2**20
    samples = [(f, round(rss / mib, 1)) for f, rss in t.rss_samples]
    table = Table(
        f"Structured fuzzing: {t.frames} hostile frames at a coordinator and a shard while a sync logreg job trains",
        ["figure", "value"],
        command=settings.command("fuzz") + (f" --fuzz-frames {frames}" if frames != (10_000 if settings.quick else 50_000) else ""),
    )
    crashes = len(r.crashed) + (0 if r.train_code == 0 else 1)
    table.rows += [
        ["seed", str(SEED)],
        ["frames sent", t.frames],
        ["connections (with the secret and without)", t.connections],
        ["connections that sent pulls at far clocks and vanished (refused: no session token)", t.parked_connections],
        ["seconds throwing / frames per s", f"{r.fuzz_s:.1f} / {t.frames / r.fuzz_s:.0f}"],
        ["job still training when the last frame was thrown", "yes" if r.overlap else "no"],
        ["crashes (processes that exited or logged a traceback, a failed job)", crashes],
        ["internal errors answered", len(t.internal_errors)],
        [f"parameters changed (weights off the clean run by > {WEIGHT_TOLERANCE:g})", r.weights_changed],
        ["largest weight difference from the clean run", r.max_weight_diff],
        ["parked pulls left at the end", r.waiting_pulls_after if r.waiting_pulls_after >= 0 else "- (the job had ended)"],
        ["shard RSS before -> after, MiB", f"{r.rss_before / mib:.1f} -> {r.rss_after / mib:.1f}"],
        ["shard RSS growth, MiB", round((r.rss_after - r.rss_before) / mib, 1)],
    ]
    table.notes.append("replies by error code: " + ", ".join(f"{k} {v}" for k, v in sorted(t.by_code.items())))
    if samples:
        step = max(1, len(samples) // 8)
        table.notes.append("shard RSS (MiB) after n frames: " + ", ".join(f"{f}: {m}" for f, m in samples[::step]))
    figures = {
        "frames": t.frames, "connections": t.connections, "parked_connections": t.parked_connections,
        "fuzz_s": r.fuzz_s, "overlap": r.overlap, "crashes": crashes, "crashed": r.crashed,
        "internal_errors": t.internal_errors, "weights_changed": r.weights_changed,
        "max_weight_diff": r.max_weight_diff, "rss_before": r.rss_before, "rss_after": r.rss_after,
        "rss_samples": t.rss_samples, "by_code": t.by_code, "train_code": r.train_code,
    }  # fmt: skip
    return SectionResult("fuzz", [table], figures)
