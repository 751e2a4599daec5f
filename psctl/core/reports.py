"""Pooling workers' epoch and final reports: (loss_sum, n, sums) added up exactly, never averaged per worker."""

from __future__ import annotations

from typing import Any


def merge_reports(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return new
    merged = {**new, "loss_sum": old["loss_sum"] + new["loss_sum"], "n": old["n"] + new["n"]}
    merged["sums"] = sum_dicts([old.get("sums", {}), new.get("sums", {})])
    if "staleness" in old or "staleness" in new:
        merged["staleness"] = count_dicts([old.get("staleness", {}), new.get("staleness", {})])
    if old.get("val") or new.get("val"):
        merged["val"] = new.get("val") or old.get("val")
    return merged


def pool(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' (loss_sum, n, sums) reports as one: mean loss, summed figures, rows, and the
    staleness the gate answered their pulls with (clocks behind -> steps), when they sent it."""
    n = sum(r["n"] for r in reports)
    pooled = {
        "loss": sum(r["loss_sum"] for r in reports) / max(n, 1),
        "sums": sum_dicts(r.get("sums", {}) for r in reports),
        "samples": n,
    }
    if any("staleness" in r for r in reports):
        pooled["staleness"] = count_dicts(r.get("staleness", {}) for r in reports)
    return pooled


def count_dicts(parts: Any) -> dict[str, int]:
    """Add up workers' counts key by key (keys as text, in numeric order); a count that is not a
    whole number >= 0, or a key that is not one, is a malformed report and raises ValueError."""
    total: dict[int, int] = {}
    for part in parts:
        if not isinstance(part, dict):
            raise ValueError("staleness must be an object of counts")
        for key, value in part.items():
            k = int(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or k < 0:
                raise ValueError("staleness counts must be whole numbers >= 0")
            total[k] = total.get(k, 0) + value
    return {str(k): total[k] for k in sorted(total)}


def sum_dicts(parts: Any) -> dict[str, float]:
    """Add up workers' additive figures (correct counts, squared errors, ...) key by key."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total
