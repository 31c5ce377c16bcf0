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

Layout note: the last stage calls `report` (below this module in DESIGN's layout) through a
lazy import; `report` itself never imports `develop` and only reads the files written here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import builtin_data
from .errors import UserError
from .files import atomic_write_json, atomic_write_text, relocate

STAGES = ("data", "pretrain", "latency", "search", "extract", "further_train", "finetune", "report")
MANIFEST = "manifest.json"
BUILTIN_CONFIGS = ("demo", "cpu-small", "paper-mlm", "paper-kd")

# --- configuration ---------------------------------------------------------------------------
# Every option, its type and default; the shipped YAML files document each one in comments.
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "run": {"seed": (int, 0), "threads": ((int, type(None)), 1), "device": (str, "cpu"), "progress": (bool, True),
            "keep_checkpoints": (bool, False)},
    "data": {"corpus": (list, [builtin_data.CORPUS]), "valid_corpus": ((list, type(None)), None),
             "tasks_dir": ((str, type(None)), builtin_data.TASK), "cache_dir": ((str, type(None)), None)},
    "pretrain": {"reuse": ((str, type(None)), None), "space": (str, "paper-mlm"), "limits": (dict, {}),
                 "objective": (str, "mlm"), "teacher": ((str, type(None)), None),
                 "tokenizer": ((str, type(None)), None), "vocab_size": ((int, type(None)), 8000),
                 "seq_len": (int, 128), "sampling": (str, "random"), "samples_per_batch": (int, 1),
                 "max_steps": (int, 1000), "batch_size": (int, 32), "grad_accum": (int, 1), "lr": (float, 1e-4),
                 "weight_decay": (float, 0.01), "warmup_ratio": (float, 0.1), "max_grad_norm": (float, 1.0),
                 "bf16": (bool, False), "log_every": (int, 10), "eval_every": (int, 200), "eval_batches": (int, 4),
                 "save_every": (int, 200), "nproc_per_node": (int, 1), "torchrun_args": (list, [])},
    "latency": {"reuse": ((str, type(None)), None), "engine": (str, "torch"), "seq_len": (int, 128), "samples": (int, 40),
                "threads": (int, 1), "warmup": (int, 3), "repeats": (int, 20), "clock": (str, "wall"),
                "hidden": (int, 64), "epochs": (int, 3000), "holdout": (float, 0.2)},
    "search": {"speedups": (list, []), "target_ms": (list, []), "range_fractions": (list, []),
               "method": (str, "fast"), "generations": ((int, type(None)), None), "generation_size": (int, 25),
               "explore_rate": (float, 0.5), "window": (list, [0.85, 1.1]), "grid_step_hidden": (int, 16),
               "grid_step_ffn": (int, 32), "metric": (str, "mlm_accuracy"), "teacher": ((str, type(None)), None),
               "eval_batch_size": (int, 32), "eval_batches": (int, 8), "evaluator": (str, "proxy"),
               "workers": (int, 1), "ft_epochs": (float, 1.0), "ft_lr": (float, 1e-4),
               "ft_max_train_examples": ((int, type(None)), 2000)},
    "extract": {"onnx": ((bool, str), "auto"), "verify": (bool, True), "latency_repeats": (int, 20)},
    "further_train": {"max_steps": (int, 0), "objective": (str, "mlm"), "teacher": ((str, type(None)), None),
                      "batch_size": (int, 32), "grad_accum": (int, 1), "lr": (float, 1e-4),
                      "weight_decay": (float, 0.01), "warmup_ratio": (float, 0.1), "bf16": (bool, False),
                      "log_every": (int, 10), "eval_every": (int, 200), "eval_batches": (int, 4),
                      "save_every": (int, 200)},
    "finetune": {"tasks": (list, []), "epochs": (float, 3.0), "max_steps": ((int, type(None)), None),
                 "lr": (float, 5e-5), "batch_size": (int, 32), "eval_batch_size": (int, 64),
                 "max_seq_length": ((int, type(None)), None), "warmup_ratio": (float, 0.1),
                 "weight_decay": (float, 0.01), "max_train_examples": ((int, type(None)), None),
                 "max_eval_examples": ((int, type(None)), None), "seed": (int, 42)},
    "report": {"title": ((str, type(None)), None)},
}


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (``demo``) or a YAML file path."""
    text = str(name_or_path)
    if text in BUILTIN_CONFIGS:
        return Path(str(resources.files("autotinybert") / "configs" / f"{text}.yaml"))
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--config {text}: no such file; give a YAML path or one of {', '.join(BUILTIN_CONFIGS)}")
    return path


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Read, apply ``section.key=value`` overrides, fill defaults and validate."""
    import yaml

    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SCHEMA)})")
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, str(path))


def _apply_override(raw: dict, item: str) -> None:
    import yaml

    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set pretrain.max_steps=50")
    if not isinstance(raw.get(section, {}), dict):
        raise UserError(f"--set {item!r}: section {section!r} is not a mapping in the config")
    raw.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else None


def validate_config(raw: dict, source: str = "config") -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = {}
    for section in raw:
        if section not in SCHEMA:
            raise UserError(f"{source}: unknown section {section!r}; use {', '.join(SCHEMA)}")
    for section, options in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise UserError(f"{source}: {section} must be a mapping of options, got {type(given).__name__}")
        for key in given:
            if key not in options:
                raise UserError(f"{source}: unknown option {section}.{key}; known: {', '.join(options)}")
        config[section] = {key: _typed(f"{section}.{key}", given.get(key, default), kind, source)
                           for key, (kind, default) in options.items()}
    _check_values(config, source)
    return config


def _typed(key: str, value: Any, kind: Any, source: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # YAML yes/no is not a number
    if not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else {"str": "a string", "int": "an integer", "float": "a number",
                                                            "bool": "true/false", "list": "a list", "dict": "a mapping"}[k.__name__]
                            for k in kinds)
        raise UserError(f"{source}: {key} must be {names}; got {value!r}")
    return value


def _check_values(config: dict, source: str) -> None:
    search = config["search"]
    if not (search["speedups"] or search["target_ms"] or search["range_fractions"]):
        raise UserError(f"{source}: give at least one target in search.speedups, search.target_ms or "
                        "search.range_fractions")
    for key in ("speedups", "target_ms", "range_fractions"):
        for value in search[key]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{source}: search.{key} must list positive numbers; got {value!r}")
            if key == "range_fractions" and value > 1:
                raise UserError(f"{source}: search.range_fractions must lie in (0, 1] (0: the fastest architecture, "
                                f"1: the slowest); got {value!r}")
    if search["evaluator"] not in ("proxy", "finetune"):
        raise UserError(f"{source}: search.evaluator must be proxy or finetune, not {search['evaluator']!r}")
    if search["evaluator"] == "finetune" and not config["finetune"]["tasks"]:
        raise UserError(f"{source}: search.evaluator finetune fine-tunes on finetune.tasks; list at least one task")
    if len(search["window"]) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in search["window"]):
        raise UserError(f"{source}: search.window must be [LOW, HIGH], e.g. [0.85, 1.1]")
    if config["extract"]["onnx"] not in (True, False, "auto"):
        raise UserError(f"{source}: extract.onnx must be true, false or auto")
    for key in ("corpus", "valid_corpus"):
        for value in config["data"][key] or []:
            if builtin_data.is_builtin(value) and value != builtin_data.CORPUS:
                raise UserError(f"{source}: data.{key}: unknown built-in corpus {value!r}; use {builtin_data.CORPUS}")
    tasks_dir = config["data"]["tasks_dir"]
    if builtin_data.is_builtin(tasks_dir) and tasks_dir != builtin_data.TASK:
        raise UserError(f"{source}: data.tasks_dir: unknown built-in task {tasks_dir!r}; use {builtin_data.TASK}")
    if config["further_train"]["max_steps"] < 0 or config["pretrain"]["nproc_per_node"] < 1:
        raise UserError(f"{source}: further_train.max_steps must be >= 0 and pretrain.nproc_per_node >= 1")


# --- manifest --------------------------------------------------------------------------------
def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(paths: list[Path]) -> str:
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

    def save_manifest(self) -> None:
        atomic_write_json(self.out / MANIFEST, self.manifest)


@contextlib.contextmanager
def _cost(entry: dict, gpus: int) -> Any:
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


# --- the pipeline ----------------------------------------------------------------------------
def develop(config: dict[str, dict[str, Any]], out: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) every stage; returns the manifest (also ``out/manifest.json``)."""
    from .latency import torch_threads

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
    threads = config["run"]["threads"]
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
    inputs = {"config": run.config[name] if name in run.config else {}, "seed": run.config["run"]["seed"],
              "upstream": {u: run.digests[u] for u in _UPSTREAM[name]}, "extra": _extra_inputs(run, name)}
    input_hash = _hash(inputs)
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
        with _cost(entry, _gpus(run, name)):
            outputs = stage(run, run.stage_dir(name), resume)
    finally:
        run.save_manifest()  # an interrupted attempt still counts its cost
    if not run.config["run"]["keep_checkpoints"]:
        _drop_checkpoints(run.stage_dir(name))
    entry.update(status="done", outputs=outputs, digest=_hash([input_hash, outputs.pop("_digest", "")]),
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
    search evaluator uses run.device; fine-tuning, latency and extraction run on the CPU."""
    if name in ("pretrain", "further_train"):
        import torch

        return run.config["pretrain"]["nproc_per_node"] if torch.cuda.is_available() else 0
    return 1 if name == "search" and run.config["run"]["device"].startswith("cuda") else 0


_UPSTREAM = {"data": (), "pretrain": ("data",), "latency": (), "search": ("data", "pretrain", "latency"),
             "extract": ("pretrain", "search", "latency"), "further_train": ("data", "extract"),
             "finetune": ("data", "further_train"),
             "report": ("pretrain", "latency", "search", "extract", "further_train", "finetune")}


def _extra_inputs(run: Run, name: str) -> Any:
    """Inputs outside the stage's own section: the latency profile depends on the space only."""
    if name == "latency":
        return {"space": _space(run.config["pretrain"]).to_dict()}
    if name == "data":
        return {"python": sys.version.split()[0]}  # the built-in corpus is this Python's docstrings
    if name in ("pretrain", "search", "further_train"):
        return {"run": {k: v for k, v in run.config["run"].items() if k not in ("progress", "keep_checkpoints")}}
    return None


def _space(pretrain: dict):
    from .search_stage import _supernet_space
    from .space import SearchSpace

    if pretrain["reuse"]:
        return _supernet_space(Path(pretrain["reuse"]))
    try:
        return SearchSpace.load(pretrain["space"]).with_limits(**pretrain["limits"])
    except TypeError as err:
        raise UserError(f"pretrain.limits: {err}; use keys layers, hidden, ffn, heads, qkv") from None


# --- stage: data ------------------------------------------------------------------------------
def _stage_data(run: Run, out: Path, resume: bool) -> dict:
    data = run.config["data"]
    corpus, valid = list(data["corpus"]), data["valid_corpus"]
    files: list[Path] = []
    if builtin_data.CORPUS in corpus or valid == [builtin_data.CORPUS]:
        train_file, valid_file = builtin_data.write_python_docs_corpus(out / "corpus")
        files += [train_file, valid_file]
        corpus = [str(train_file) if c == builtin_data.CORPUS else c for c in corpus]
        valid = [str(valid_file)] if valid in (None, [builtin_data.CORPUS]) else valid
    for key, paths in (("corpus", corpus), ("valid_corpus", valid or [])):
        for path in paths:
            if not path.startswith("hf:") and not Path(path).exists():
                raise UserError(f"data.{key}: {path} does not exist; fix the path (or use {builtin_data.CORPUS})")
    if not valid:
        raise UserError("data.valid_corpus: give held-out text files (validation, and the search's proxy evaluator "
                        "scores architectures on them)")
    tasks_dir = data["tasks_dir"]
    if tasks_dir == builtin_data.TASK:
        tasks_dir = str(builtin_data.write_vader_task(out / "tasks"))
        files += sorted((out / "tasks").rglob("*.tsv"))
    elif run.config["finetune"]["tasks"] and (tasks_dir is None or not Path(tasks_dir).is_dir()):
        raise UserError(f"data.tasks_dir: {tasks_dir} is not a directory; give the glue_data folder "
                        f"(or {builtin_data.TASK}), or set finetune.tasks: []")
    outputs = {"corpus": corpus, "valid_corpus": valid, "tasks_dir": tasks_dir,
               "builtin_task": data["tasks_dir"] == builtin_data.TASK}
    outputs["_digest"] = _file_hash(files) if files else _hash(outputs)
    return outputs


# --- stage: pretrain ------------------------------------------------------------------------
def _pretrain_settings(run: Run, out: Path, **changes: Any):
    from .pretrain import PretrainSettings

    p, data = run.config["pretrain"], run.outputs["data"]
    keys = ("objective", "teacher", "tokenizer", "vocab_size", "seq_len", "sampling", "samples_per_batch", "max_steps",
            "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "bf16", "log_every",
            "eval_every", "eval_batches", "save_every")
    settings = {key: p[key] for key in keys}
    settings.update(out=str(out), corpus=data["corpus"], valid_corpus=data["valid_corpus"], space=p["space"],
                    space_limits=dict(p["limits"]), seed=run.config["run"]["seed"],
                    cache_dir=run.config["data"]["cache_dir"], progress=run.config["run"]["progress"])
    settings.update(changes)
    return PretrainSettings(**settings)


def _stage_pretrain(run: Run, out: Path, resume: bool) -> dict:
    from .evaluators import file_digest
    from .pretrain import CHECKPOINT_DIR, pretrain

    reuse = run.config["pretrain"]["reuse"]
    if reuse:
        if not (Path(reuse) / "model.safetensors").is_file():
            raise UserError(f"pretrain.reuse: {reuse} is not a SuperPLM checkpoint (no model.safetensors)")
        return {"supernet": str(Path(reuse).absolute()), "reused": True,
                "_digest": file_digest(Path(reuse) / "model.safetensors")}
    settings = _pretrain_settings(run, out)
    again = (out / CHECKPOINT_DIR / "trainer_state.json").is_file()
    if run.config["pretrain"]["nproc_per_node"] > 1:
        _torchrun_pretrain(run, settings, again)
        summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    else:
        if not again:
            shutil.rmtree(out, ignore_errors=True)
        summary = pretrain(settings, resume=again)
    return {"supernet": str(out), "steps": summary["steps"], "_digest": summary["weights_digest"]}


def _torchrun_pretrain(run: Run, settings, resume: bool) -> None:
    """Several processes cannot share this one: launch ``torchrun -m autotinybert pretrain``."""
    p = run.config["pretrain"]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p['nproc_per_node']}",
               *map(str, p["torchrun_args"]), "-m", "autotinybert", "pretrain", *pretrain_arguments(settings)]
    if resume:
        command.append("--resume")
    run.log("  " + " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise UserError(f"torchrun pretrain exited with code {code}; see its output above, fix it and rerun "
                        "develop (it continues from the last checkpoint)")


def pretrain_arguments(settings) -> list[str]:
    """The `autotinybert pretrain` command line equivalent to ``settings``."""
    args = ["--out", settings.out, "--corpus", *settings.corpus]
    flags = {"valid_corpus": "--valid-corpus", "tokenizer": "--tokenizer", "vocab_size": "--vocab-size",
             "teacher": "--teacher", "arch": "--arch", "init": "--init", "cache_dir": "--cache-dir"}
    for name, flag in flags.items():
        value = getattr(settings, name)
        if value:
            args += [flag, *value] if isinstance(value, list) else [flag, str(value)]
    for name in ("space", "objective", "sampling", "samples_per_batch", "max_steps", "batch_size", "grad_accum", "lr",
                 "weight_decay", "warmup_ratio", "max_grad_norm", "seq_len", "seed", "log_every", "eval_every",
                 "eval_batches", "save_every"):
        args += [f"--{name.replace('_', '-')}", str(getattr(settings, name))]
    for dim, value in settings.space_limits.items():
        args += [f"--max-{dim}", str(value)]
    return args + (["--bf16"] if settings.bf16 else []) + ([] if settings.progress else ["--no-progress"])


# --- stage: latency ---------------------------------------------------------------------------
def _stage_latency(run: Run, out: Path, resume: bool) -> dict:
    from .latency import LatencyPredictor, LatencySettings, fit, profile

    lat = run.config["latency"]
    if lat["reuse"]:
        predictor = LatencyPredictor.load(lat["reuse"])  # warns when fitted on another device
        return {"predictor": str(Path(lat["reuse"]).absolute()), "reused": True,
                "reference_ms": predictor.reference_ms, "_digest": _file_hash([Path(lat["reuse"])])}
    settings = LatencySettings(engine=lat["engine"], threads=lat["threads"], warmup=lat["warmup"],
                               repeats=lat["repeats"], clock=lat["clock"], seq_len=lat["seq_len"])
    data = out / "profile.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    profile(_space(run.config["pretrain"]), lat["samples"], data, settings, seed=run.config["run"]["seed"],
            resume=data.is_file(), progress=run.config["run"]["progress"])
    predictor, report = fit(data, holdout=lat["holdout"], seed=run.config["run"]["seed"], hidden=lat["hidden"],
                            epochs=lat["epochs"])
    predictor.save(out / "predictor.json")
    atomic_write_json(out / "results.json", report)
    run.log(f"  predictor: held-out MAPE {report['mlp']['mape_pct']:.1f}%, BERT-base {predictor.reference_ms:.1f} ms")
    return {"predictor": str(out / "predictor.json"), "profile": str(data), "reference_ms": predictor.reference_ms,
            "mape_pct": report["mlp"]["mape_pct"], "_digest": _file_hash([out / "predictor.json"])}


# --- stage: search ----------------------------------------------------------------------------
def search_targets_ms(search: dict, predictor, space) -> list[float]:
    """``target_ms`` plus one target per ``range_fractions`` entry f: the latency f of the way from
    the space's fastest architecture to its slowest, as predicted (0: smallest, 1: largest). Such
    targets mean the same on every machine and always fall inside the space (demos, CI)."""
    low, high = predictor.predict(space.smallest()), predictor.predict(space.largest())
    return [float(ms) for ms in search["target_ms"]] + [round(low + f * (high - low), 3) for f in search["range_fractions"]]


def _stage_search(run: Run, out: Path, resume: bool) -> dict:
    from .latency import LatencyPredictor
    from .search import SearchSettings
    from .search_stage import _supernet_space, run_search_stage

    s = run.config["search"]
    supernet, predictor_file = Path(run.outputs["pretrain"]["supernet"]), Path(run.outputs["latency"]["predictor"])
    predictor = LatencyPredictor.load(predictor_file, check_fingerprint=False)
    target_ms = search_targets_ms(s, predictor, _supernet_space(supernet))
    generations = s["generations"] or (1 if s["method"] == "fast" else 10)
    settings = SearchSettings(method=s["method"], generations=generations, generation_size=s["generation_size"],
                              explore_rate=s["explore_rate"], window=tuple(s["window"]), seed=run.config["run"]["seed"])
    again = (out / "state.json").is_file()
    if not again:
        shutil.rmtree(out, ignore_errors=True)
    summary = run_search_stage(
        supernet=supernet, predictor=predictor_file, speedups=[float(x) for x in s["speedups"]], target_ms=target_ms,
        settings=settings, evaluator=s["evaluator"], finetune=_search_finetune_options(run), workers=s["workers"],
        valid_corpus=run.outputs["data"]["valid_corpus"], out=out, resume=again,
        grid_step_hidden=s["grid_step_hidden"], grid_step_ffn=s["grid_step_ffn"], metric=s["metric"],
        teacher=s["teacher"], seq_len=run.config["pretrain"]["seq_len"], eval_batch_size=s["eval_batch_size"],
        eval_batches=s["eval_batches"], cache_dir=run.config["data"]["cache_dir"], device=run.config["run"]["device"],
        progress=run.config["run"]["progress"], arguments={"develop": True, **s, "target_ms": target_ms})
    best = {row["target"]: row["arch"] for row in summary["best"]}
    for row in summary["best"]:
        run.log(f"  {row['target']:>10}: {row['arch']} ({row['latency_ms']:.2f} ms predicted, fitness {row['fitness']:.4f})")
    return {"results": str(out / "results.json"), "best": best, "_digest": _hash(summary["best"])}


def _search_finetune_options(run: Run) -> dict | None:
    """The finetune evaluator's options: the finetune section's tasks and data, the search's budget."""
    from .tasks.finetune import FinetuneSettings

    s, f = run.config["search"], run.config["finetune"]
    if s["evaluator"] != "finetune":
        return None
    settings = FinetuneSettings(epochs=s["ft_epochs"], learning_rate=s["ft_lr"], batch_size=f["batch_size"],
                                eval_batch_size=f["eval_batch_size"], max_seq_length=f["max_seq_length"],
                                max_train_examples=s["ft_max_train_examples"], max_eval_examples=f["max_eval_examples"],
                                seed=f["seed"], group_by_length=True)
    return {"tasks": f["tasks"], "data_dir": Path(run.outputs["data"]["tasks_dir"]), "settings": settings}


# --- stage: extract ---------------------------------------------------------------------------
def _stage_extract(run: Run, out: Path, resume: bool) -> dict:
    from .export import export_checkpoint

    e = run.config["extract"]
    onnx = _onnx_available() if e["onnx"] == "auto" else e["onnx"]
    models = {}
    for target, arch in run.outputs["search"]["best"].items():
        model_dir = out / _safe(target)
        if not (model_dir / "results.json").is_file():
            run.log(f"  {target}: extract {arch}" + (" (+ ONNX)" if onnx else ""))
            export_checkpoint(run.outputs["pretrain"]["supernet"], arch, model_dir, onnx=onnx, verify=e["verify"],
                              overwrite=True)
        if not (model_dir / "latency.json").is_file():
            atomic_write_json(model_dir / "latency.json", measure_exported(run, arch))
        models[target] = {"arch": arch, "path": str(model_dir)}
    return {"models": models, "_digest": _file_hash([out / _safe(t) / "model.safetensors" for t in models])}


def measure_exported(run: Run, arch: str) -> dict:
    """Measured latency of an exported architecture, with the predictor's settings, next to its prediction."""
    from .latency import LatencyPredictor, _settings_of, measure

    predictor = LatencyPredictor.load(run.outputs["latency"]["predictor"], check_fingerprint=False)
    record = measure(arch, _settings_of(predictor.fingerprint, warmup=3, repeats=run.config["extract"]["latency_repeats"]))
    record["predicted_ms"] = predictor.predict(arch)
    record["reference_ms"] = predictor.reference_ms
    return record


def _safe(name: str) -> str:
    return "target-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


# --- stage: further_train ---------------------------------------------------------------------
def _stage_further_train(run: Run, out: Path, resume: bool) -> dict:
    from .pretrain import CHECKPOINT_DIR, pretrain

    f = run.config["further_train"]
    extracted = run.outputs["extract"]["models"]
    if f["max_steps"] == 0:  # the inherited weights are the final ones
        return {"models": {t: {**m, "source": m["path"]} for t, m in extracted.items()}, "skipped": True,
                "_digest": run.digests["extract"]}
    models, digests = {}, []
    for target, model in extracted.items():
        target_dir = out / _safe(target)
        if not (target_dir / "results.json").is_file():
            run.log(f"  {target}: further-train {model['arch']} for {f['max_steps']} steps ({f['objective']})")
            changes = {k: f[k] for k in ("max_steps", "objective", "teacher", "batch_size", "grad_accum", "lr",
                                         "weight_decay", "warmup_ratio", "bf16", "log_every", "eval_every",
                                         "eval_batches", "save_every")}
            settings = _pretrain_settings(run, target_dir, arch=model["arch"], init=model["path"], tokenizer=None,
                                          vocab_size=None, **changes)
            again = (target_dir / CHECKPOINT_DIR / "trainer_state.json").is_file()
            if run.config["pretrain"]["nproc_per_node"] > 1:
                _torchrun_pretrain(run, settings, again)
            else:
                pretrain(settings, resume=again)
        summary = json.loads((target_dir / "results.json").read_text(encoding="utf-8"))
        models[target] = {"arch": model["arch"], "path": str(target_dir / "exported"), "source": model["path"],
                          "run": str(target_dir)}
        digests.append(summary["weights_digest"])
    return {"models": models, "_digest": _hash(digests)}


# --- stage: finetune ---------------------------------------------------------------------------
def _stage_finetune(run: Run, out: Path, resume: bool) -> dict:
    from .tasks.finetune import FinetuneSettings
    from .tasks.run import run_finetune

    f = run.config["finetune"]
    if not f["tasks"]:
        return {"runs": {}, "_digest": ""}
    settings = FinetuneSettings(epochs=f["epochs"], max_steps=f["max_steps"], learning_rate=f["lr"],
                                batch_size=f["batch_size"], eval_batch_size=f["eval_batch_size"],
                                max_seq_length=f["max_seq_length"], warmup_ratio=f["warmup_ratio"],
                                weight_decay=f["weight_decay"], seed=f["seed"],
                                max_train_examples=f["max_train_examples"], max_eval_examples=f["max_eval_examples"],
                                progress=run.config["run"]["progress"])
    runs, digests = {}, []
    for target, model in run.outputs["further_train"]["models"].items():
        target_dir = out / _safe(target)
        if not _finished(target_dir, f["tasks"]):
            run.log(f"  {target}: fine-tune {model['arch']} on {', '.join(f['tasks'])}")
            run_finetune(model=Path(model["path"]), tasks=f["tasks"], out=target_dir, settings=settings,
                         data_dir=Path(run.outputs["data"]["tasks_dir"]), test=False,
                         resume=(target_dir / "config.yaml").is_file(), arguments={"model": model["path"], **f})
        results = json.loads((target_dir / "results.json").read_text(encoding="utf-8"))
        runs[target] = str(target_dir)
        digests.append({t: r["score"] for t, r in results["tasks"].items()})
    return {"runs": runs, "_digest": _hash(digests)}


def _finished(target_dir: Path, tasks: list[str]) -> bool:
    from .tasks.run import resolve_tasks

    path = target_dir / "results.json"
    if not path.is_file():
        return False
    done = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
    return all(t.name in done for t in resolve_tasks(tasks))


# --- stage: report -----------------------------------------------------------------------------
def _stage_report(run: Run, out: Path, resume: bool) -> dict:
    from .report import build_report

    run.save_manifest()  # the report reads the manifest's costs and outputs
    paths = build_report(run.out, out, title=run.config["report"]["title"])
    return {**{k: str(v) for k, v in paths.items()}, "_digest": ""}


_STAGE_FUNCTIONS: dict[str, Callable[[Run, Path, bool], dict]] = {
    "data": _stage_data, "pretrain": _stage_pretrain, "latency": _stage_latency, "search": _stage_search,
    "extract": _stage_extract, "further_train": _stage_further_train, "finetune": _stage_finetune,
    "report": _stage_report,
}


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


def write_resolved_config(out: Path, config: dict) -> None:
    import yaml

    atomic_write_text(Path(out) / "config.yaml", yaml.safe_dump(config, sort_keys=False))

