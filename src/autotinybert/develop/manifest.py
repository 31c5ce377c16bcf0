"""The run directory's ``manifest.json``: per stage, its input hash, status, outputs and cost.

Hashes decide what a rerun does (see `autotinybert.develop`): same inputs and ``done`` → skip;
same inputs and ``running`` → continue; changed inputs → redo the stage and everything after it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..files import atomic_write_json

MANIFEST = "manifest.json"


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {"format": "autotinybert-develop", "stages": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err.msg}); delete it to start the run over") from None


@dataclass
class Run:
    """One pipeline run: its directory, config, manifest, and the outputs of finished stages."""

    out: Path
    config: dict[str, dict[str, Any]]
    manifest: dict = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    @functools.cached_property
    def settings(self) -> Any:
        """The config as typed settings (`config.DevelopSettings`): what the stages read."""
        from .config import develop_settings

        return develop_settings(self.config)

    def save_manifest(self) -> None:
        atomic_write_json(self.out / MANIFEST, self.manifest)


@contextlib.contextmanager
def cost(entry: dict, gpus: int) -> Any:
    """Add this attempt's wall time, CPU time (this process and its children) and GPU time."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        yield
    finally:
        seconds = time.perf_counter() - wall
        entry["wall_seconds"] = round(entry.get("wall_seconds", 0.0) + seconds, 2)
        entry["cpu_hours"] = round(entry.get("cpu_hours", 0.0) + (_cpu_seconds() - cpu) / 3600, 5)
        entry["gpu_hours"] = round(entry.get("gpu_hours", 0.0) + seconds * gpus / 3600, 5)
        entry["attempts"] = entry.get("attempts", 0) + 1


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
