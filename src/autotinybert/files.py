"""Atomic file writes and the per-stage `config.yaml` / `results.json` convention.

Every stage writes into its own `--out` directory. Files appear whole or not at all: we write
a temporary file in the same directory and `os.replace` it, so an interrupted run never leaves
a half-written JSON or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_stage_config(out_dir: str | Path, arguments: dict[str, Any]) -> None:
    """Record every argument as used, so a stage can be rerun or audited."""
    import yaml

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items() if not callable(v)}
    atomic_write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(clean, sort_keys=True))


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when complete.

    An existing non-empty `out_dir` is an error unless `overwrite` is set; with `overwrite`, the
    old directory is replaced only after the new one is finished, so a failure loses nothing.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir} already exists and is not empty; pass --overwrite or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def relocate(value: Any, old_root: str | None, new_root: str | Path) -> Any:
    """``value`` (nested dicts/lists of strings) with paths under ``old_root`` moved to ``new_root``:
    a run directory copied or moved elsewhere keeps working from its recorded paths."""
    new_root = str(new_root)
    if not old_root or old_root == new_root:
        return value
    if isinstance(value, dict):
        return {k: relocate(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old_root, new_root) for v in value]
    if isinstance(value, str) and (value == old_root or value.startswith(old_root + os.sep)):
        return new_root + value[len(old_root):]
    return value
