"""Pooling workers' epoch and final reports: (loss_sum, n, sums) added up exactly, never averaged per worker."""

from __future__ import annotations

from typing import Any


def merge_reports(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return new
    merged = {**new, "loss_sum": old["loss_sum"] + new["loss_sum"], "n": old["n"] + new["n"]}
    merged["sums"] = sum_dicts([old.get("sums", {}), new.get("sums", {})])
    if old.get("val") or new.get("val"):
        merged["val"] = new.get("val") or old.get("val")
    return merged


def pool(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' (loss_sum, n, sums) reports as one: mean loss, summed figures, rows."""
    n = sum(r["n"] for r in reports)
    return {
        "loss": sum(r["loss_sum"] for r in reports) / max(n, 1),
        "sums": sum_dicts(r.get("sums", {}) for r in reports),
        "samples": n,
    }


def sum_dicts(parts: Any) -> dict[str, float]:
    """Add up workers' additive figures (correct counts, squared errors, ...) key by key."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total
