"""Hardware + software fingerprint of a measurement, and which differences make latencies incomparable."""

from __future__ import annotations

from typing import Any

from ..settings import LatencySettings
from .runner import machine_fingerprint

# Fingerprint keys that must agree for a latency number to transfer (shapes, engine and deployed
# form change the workload; CPU model and core count change the hardware; library versions change
# the kernels).
_FINGERPRINT_KEYS = ("cpu_model", "logical_cpus", "engine", "engine_version", "batch_size", "seq_len", "threads", "clock",
                     "optimize", "quantize")
# Keys added after the first records were written: what an older record measured.
SHAPE_DEFAULTS = {"optimize": False, "quantize": "none"}


def fingerprint(settings: LatencySettings) -> dict[str, Any]:
    """Hardware + software + shapes of a measurement; stored with every record and predictor."""
    return machine_fingerprint(settings.shape())


def _get(fp: dict[str, Any], key: str) -> Any:
    return fp.get(key, SHAPE_DEFAULTS.get(key))


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable ``key: expected -> actual`` for the keys that make latencies incomparable."""
    return [f"{key}: {_get(expected, key)!r} -> {_get(actual, key)!r}"
            for key in _FINGERPRINT_KEYS if _get(expected, key) != _get(actual, key)]


def shape_of(fp: dict[str, Any]) -> dict[str, Any]:
    """The `LatencySettings.shape` a fingerprint was measured with (older records: their defaults)."""
    return {key: _get(fp, key) for key in LatencySettings().shape()}


def settings_of(fp: dict[str, Any], **timing: Any) -> LatencySettings:
    """The settings a fingerprint was measured with (to re-measure or compare like with like)."""
    shape = {**LatencySettings().shape(), **{k: v for k, v in shape_of(fp).items() if v is not None}}
    return LatencySettings(**shape, **timing)
