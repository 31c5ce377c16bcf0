"""Hardware + software fingerprint of a measurement, and which differences make latencies incomparable."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from ..settings import LatencySettings

# Fingerprint keys that must agree for a latency number to transfer (shapes and engine change the
# workload; CPU model and core count change the hardware; library versions change the kernels).
_FINGERPRINT_KEYS = ("cpu_model", "logical_cpus", "engine", "engine_version", "batch_size", "seq_len", "threads", "clock")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo; None where unavailable."""
    with contextlib.suppress(OSError):
        cores, physical = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
        return len(cores) or None
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def fingerprint(settings: LatencySettings) -> dict[str, Any]:
    """Hardware + software + shapes of a measurement; stored with every record and predictor."""
    versions = {name: _version(name) for name in ("torch", "onnxruntime", "transformers", "numpy")}
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "versions": versions,
        "engine_version": versions["torch" if settings.engine == "torch" else "onnxruntime"],
        **settings.shape(),
    }


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable ``key: expected -> actual`` for the keys that make latencies incomparable."""
    return [f"{key}: {expected.get(key)!r} -> {actual.get(key)!r}"
            for key in _FINGERPRINT_KEYS if expected.get(key) != actual.get(key)]


def settings_of(fp: dict[str, Any], **timing: int) -> LatencySettings:
    """The settings a fingerprint was measured with (to re-measure or compare like with like)."""
    return LatencySettings(engine=fp.get("engine", "torch"), batch_size=fp.get("batch_size", 1),
                           seq_len=fp.get("seq_len", 128), threads=fp.get("threads", 1), clock=fp.get("clock", "wall"),
                           **timing)
