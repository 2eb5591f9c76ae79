"""What the benchmark scripts share: device memory peaks and a JSON file of figures
(``--json``, read by ``gpu_check.sh`` to print its summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev: torch.device) -> float:
    """Peak allocated device memory since :func:`reset_peak` (0 on a CPU: no allocator
    peak to read; the process RSS would count everything else in the process)."""
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
