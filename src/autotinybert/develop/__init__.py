"""`autotinybert develop`: the efficient development method (paper §3.4) as one resumable pipeline.

    data ─► pretrain ─► latency ─► search ─► extract ─► further_train ─► finetune ─► report

Each stage writes its own directory under the run directory and calls the stage's own function
in-process (multi-GPU pre-training launches ``torchrun`` instead, see `_torchrun_pretrain`).
``manifest.json`` records, per stage, a hash of its inputs (its config section and the digests
of the upstream outputs it reads), the digest of what it produced, its status and its cost
(wall time, CPU hours, GPU hours, summed over attempts). On a rerun:

* same inputs, status ``done``     → skipped;
* same inputs, status ``running``  → continued with that stage's own resume support
  (pre-training from its checkpoint, latency profile from its JSONL, search from its state,
  fine-tuning per task; extraction per target);
* changed inputs                   → the stage directory is removed and the stage runs again;
  a stage's digest includes its input hash, so everything downstream reruns too.

Modules: `config` (the YAML sections, derived from `autotinybert.settings`), `manifest`
(hashes, status, cost), `stages` (the eight stage functions), this one (the pipeline loop).
The last stage calls `report` (below this package in DESIGN's layout) through a lazy import;
`report` itself never imports `develop` and only reads the files written here.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..files import atomic_write_json, relocate
from .config import BUILTIN_CONFIGS, SECTIONS, load_config, validate_config, write_resolved_config
from .manifest import MANIFEST, Run, cost, read_manifest, stable_hash
from .stages import _STAGE_FUNCTIONS, pretrain_arguments, space_of

__all__ = ["BUILTIN_CONFIGS", "MANIFEST", "SECTIONS", "STAGES", "Run", "develop", "final_models", "load_config",
           "pretrain_arguments", "remove_run", "summary", "validate_config"]

STAGES = ("data", "pretrain", "latency", "search", "extract", "further_train", "finetune", "report")


def develop(config: dict[str, dict[str, Any]], out: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) every stage; returns the manifest (also ``out/manifest.json``)."""
    from ..latency import torch_threads

    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out {out} is not empty and holds no develop run (no {MANIFEST}); choose a new or empty "
                        "directory (a rerun deletes the stage folders it redoes)")
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    manifest["stages"] = relocate(manifest.get("stages", {}), manifest.get("run_dir"), out)  # a moved run
    run = Run(out, config, manifest, log=log)
    run.manifest.update(run_dir=str(out), config=config)
    write_resolved_config(out, config)
    threads = run.settings.run.threads
    with torch_threads(threads) if threads else contextlib.nullcontext():
        for number, name in enumerate(STAGES, 1):
            _run_stage(run, name, number)
    run.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    run.save_manifest()
    atomic_write_json(out / "results.json", summary(run.manifest))
    return run.manifest


def summary(manifest: dict) -> dict:
    """``RUN/results.json``: the delivered models, the report, and what each stage cost."""
    stages = manifest["stages"]
    return {"models": final_models(manifest), "report": stages["report"]["outputs"],
            "best": stages["search"]["outputs"]["best"],
            "cost": {name: {k: e.get(k) for k in ("wall_seconds", "cpu_hours", "gpu_hours", "attempts")}
                     for name, e in stages.items()}}


def _run_stage(run: Run, name: str, number: int) -> None:
    stage = _STAGE_FUNCTIONS[name]
    inputs = {"config": run.config[name] if name in run.config else {}, "seed": run.settings.run.seed,
              "upstream": {u: run.digests[u] for u in _UPSTREAM[name]}, "extra": _extra_inputs(run, name)}
    input_hash = stable_hash(inputs)
    entries = run.manifest.setdefault("stages", {})
    entry = entries.get(name)
    if entry and entry.get("input_hash") == input_hash and entry.get("status") == "done":
        run.log(f"[{number}/{len(STAGES)}] {name}: done already ({entry['wall_seconds']:.0f} s), skipped")
        run.outputs[name], run.digests[name] = entry["outputs"], entry["digest"]
        return
    resume = bool(entry and entry.get("input_hash") == input_hash)
    if not resume:
        shutil.rmtree(run.stage_dir(name), ignore_errors=True)
        entry = {"input_hash": input_hash}
    entry.update(status="running", started=entry.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"))
    entries[name] = entry
    run.save_manifest()
    run.log(f"[{number}/{len(STAGES)}] {name}" + (": continuing an interrupted attempt" if resume else ""))
    try:
        with cost(entry, _gpus(run, name)):
            outputs = stage(run, run.stage_dir(name), resume)
    finally:
        run.save_manifest()  # an interrupted attempt still counts its cost
    if not run.settings.run.keep_checkpoints:
        _drop_checkpoints(run.stage_dir(name))
    entry.update(status="done", outputs=outputs, digest=stable_hash([input_hash, outputs.pop("_digest", "")]),
                 finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    run.outputs[name], run.digests[name] = outputs, entry["digest"]
    run.save_manifest()


def _drop_checkpoints(stage_dir: Path) -> None:
    """Optimizer states of a finished stage are never read again (a changed stage starts over)."""
    if stage_dir.is_dir():
        for checkpoint in sorted(stage_dir.rglob("checkpoint")):
            if checkpoint.is_dir():
                shutil.rmtree(checkpoint)


def _gpus(run: Run, name: str) -> int:
    """GPUs a stage occupies: pre-training picks CUDA by itself when present (one per process); the
    search evaluator, fine-tuning and the task route's training use run.device; latency and
    extraction run on the CPU."""
    if name in ("pretrain", "further_train") and not run.settings.task.enabled:
        import torch

        return run.settings.pretrain.nproc_per_node if torch.cuda.is_available() else 0
    on_device = ("search", "finetune", "pretrain", "further_train")
    return 1 if name in on_device and run.settings.run.device.startswith("cuda") else 0


_UPSTREAM = {"data": (), "pretrain": ("data",), "latency": (), "search": ("data", "pretrain", "latency"),
             "extract": ("pretrain", "search", "latency"), "further_train": ("data", "extract"),
             "finetune": ("data", "further_train"),
             "report": ("pretrain", "latency", "search", "extract", "further_train", "finetune")}


def _extra_inputs(run: Run, name: str) -> Any:
    """Inputs outside the stage's own section: the latency profile depends on the space only."""
    if name == "latency":
        return {"space": space_of(run.settings).to_dict()}
    if name == "data":
        return {"python": sys.version.split()[0]}  # the built-in corpus is this Python's docstrings
    route = {"task": run.config["task"]} if run.settings.task.enabled else {}
    if name in ("pretrain", "search", "further_train"):
        return {"run": {k: v for k, v in run.config["run"].items() if k not in ("progress", "keep_checkpoints")},
                **route, **({"finetune": run.config["finetune"]} if route else {})}
    return route or None


def remove_run(out: Path) -> None:
    """Delete a previous run (``--overwrite``), refusing directories that are not runs."""
    out = Path(out)
    if not out.exists():
        return
    if not (out / MANIFEST).is_file():
        raise UserError(f"--overwrite: {out} holds no develop run (no {MANIFEST}); not deleting it")
    shutil.rmtree(out)


def final_models(manifest: dict) -> dict[str, str]:
    """``{target: path}`` of the models a finished run delivers."""
    return {t: m["path"] for t, m in manifest["stages"]["further_train"]["outputs"]["models"].items()}
