"""Results as plain JSON values, for ``--json`` output and for programs that read it."""

from __future__ import annotations

from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as plain numbers and lists, and NaN or infinity as None
    (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def checkpoint_failed_line(event: dict[str, Any]) -> str:
    """The one sentence for a ``checkpoint_failed`` event: which save failed and why, and what
    is still there to resume from (training goes on without that checkpoint)."""
    last = event.get("last_clock")
    kept = (
        f"the checkpoint at clock {last} stays the one to resume from (--resume {event.get('dir')})"
        if last is not None
        else "there is no checkpoint to resume from yet"
    )
    return f"{event['reason']}; training goes on without it, and {kept}"
