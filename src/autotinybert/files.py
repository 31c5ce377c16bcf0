"""Crash-safe file writes and the per-stage `config.yaml` / `results.json` convention.

Every stage writes into its own `--out` directory, and a process may be killed (SIGKILL, power
loss) at any instant. The rules that keep every file old-and-complete or new-and-complete:

* A file is written under a temporary name in its own directory (`.NAME.*.tmp`), flushed and
  fsynced, then `os.replace`d over NAME (atomic on POSIX), then the directory is fsynced.
* A directory is built under `.NAME.*.partial`, fsynced, then swapped in: NAME is renamed to
  `.NAME.old`, the new one to NAME, and `.NAME.old` is deleted. A kill between the two renames
  leaves only `.NAME.old`: `recover(parent)` (called by every stage when it starts on an existing
  `--out`) renames it back, and deletes the leftovers (`.*.tmp`, `.*.partial`, stale `.*.old`) of
  killed writes. Those leftovers never hold the only copy of anything.
* Training checkpoints use a pointer file instead of a swap, so their directory never
  disappears even for an instant (see `training.save_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)  # mkstemp creates 0600 files; written files get the usual 0666 & ~umask instead


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates the file's content at a temporary path; it then replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(Path(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_stage_config(out_dir: str | Path, arguments: dict[str, Any]) -> None:
    """Record every argument as used, so a stage can be rerun or audited."""
    import yaml

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items() if not callable(v)}
    atomic_write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(clean, sort_keys=True))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(directory: str | Path) -> None:
    """Undo what a killed write left in ``directory`` (one level, not recursive).

    Call it only on a directory this process owns (a run's `--out`): it deletes every `.*.tmp`
    and `.*.partial` entry, which would also break a write in progress by another process.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        if name.endswith(".old"):
            original = directory / name[1:-len(".old")]
            if original.exists():
                _remove(entry)  # the swap finished; only the deletion of the old copy was lost
            else:
                os.replace(entry, original)  # killed between the two renames: the old copy comes back
        elif name.endswith((".tmp", ".partial")):
            _remove(entry)


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when complete.

    An existing non-empty `out_dir` is an error unless `overwrite` is set; with `overwrite`, the
    old directory is replaced only after the new one is finished, so a failure loses nothing
    (a kill mid-swap is undone by `recover`).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory; choose another path")
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists() and not out_dir.exists():
        os.replace(old, out_dir)  # an earlier swap was killed half-way
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir} already exists and is not empty; pass --overwrite or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        _remove(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
        _remove(old)
    else:
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)


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


@dataclasses.dataclass(frozen=True)
class RunDirectory:
    """Where a resumable run (pretrain, finetune) writes, and how it is published.

    The rules, one place for every such stage:

    * a new run works in ``out`` itself (a partial run there is what ``--resume`` continues);
    * a non-empty ``out`` is refused unless ``--resume`` (it holds our run: ``marker``) or
      ``--overwrite``; replacing works in the sibling ``.<name>.partial`` and swaps it in only when
      complete (`publish`), so an interrupted overwrite loses nothing and ``--resume`` continues it;
    * ``--resume`` where nothing was written yet starts the run (the resume rule of training.py).

    `plan` only reads the file system (every worker of a multi-process run can call it); `create`
    (one process) makes the folder once every input has been checked.
    """

    out: Path
    work: Path
    resume: bool
    marker: str = "config.yaml"

    @property
    def replacing(self) -> bool:
        return self.work != self.out

    @classmethod
    def plan(cls, out: str | Path, *, resume: bool, overwrite: bool, marker: str = "config.yaml") -> "RunDirectory":
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        partial = out.with_name(f".{out.name}.partial")
        old = out.with_name(f".{out.name}.old")
        current = old if old.is_dir() and not out.exists() else out  # a kill mid-swap: the old copy counts
        ours = (current / marker).is_file()
        if resume:
            if (partial / marker).is_file():
                return cls(out, partial, True, marker)
            if ours or not _has_content(current):
                return cls(out, out, ours, marker)
            raise UserError(f"--resume: {out} holds no run (no {marker}) and is not empty; choose another --out, "
                            "or pass --overwrite instead of --resume to replace it")
        if _has_content(current):
            if not overwrite:
                raise UserError(f"--out {out} already exists and is not empty; pass --resume to continue it, "
                                f"--overwrite to replace it, or choose another path")
            return cls(out, partial, False, marker)
        return cls(out, out, False, marker)

    def create(self, arguments: dict[str, Any]) -> Path:
        """Undo what a killed attempt left, make the working folder and record ``arguments`` in its
        marker before anything else is written there (a kill at any later instant leaves a folder
        ``--resume`` recognises as ours); returns the folder."""
        old = self.out.with_name(f".{self.out.name}.old")
        if old.is_dir() and not self.out.exists():
            os.replace(old, self.out)  # a kill in the middle of the final swap: the old copy comes back first
        if self.replacing and not self.resume:
            shutil.rmtree(self.work, ignore_errors=True)
        if (self.out / self.marker).is_file() or not _has_content(self.out):
            recover(self.out)  # ours: undo what a killed attempt left behind
        if self.replacing:
            recover(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        write_stage_config(self.work, arguments)
        return self.work

    def publish(self) -> None:
        """Swap a finished replacement in (a no-op for a run that worked in ``out``)."""
        if not self.replacing:
            return
        old = self.out.with_name(f".{self.out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.out, old)
        os.replace(self.work, self.out)
        fsync_path(self.out.parent)
        shutil.rmtree(old, ignore_errors=True)


def _has_content(directory: Path) -> bool:
    """``directory`` holds something besides leftovers of killed writes (``.*.tmp`` / ``.*.partial``)."""
    return directory.is_dir() and any(not (e.name.startswith(".") and e.name.endswith((".tmp", ".partial")))
                                      for e in directory.iterdir())
