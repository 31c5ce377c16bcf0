"""The `finetune` and `evaluate` stages: output folders, resume, submission files, tables.

Layout of a fine-tuning run (`--out RUN`):

    RUN/config.yaml                 every argument as used
    RUN/results.json                per-task dev scores, GLUE average, timings (rewritten per task)
    RUN/<task>/model/               best-dev model + tokenizer (AutoModelFor*.from_pretrained)
    RUN/<task>/checkpoint/          last checkpoint, for --resume
    RUN/<task>/results.json         the task's record; its presence marks the task done
    RUN/submission/<TASK>.tsv       GLUE test predictions (index<TAB>prediction), when test files exist
    RUN/<task>/dev_predictions.json SQuAD answers per question id (official format)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..checkpoint import check_checkpoint
from ..errors import UserError, reading
from ..files import RunDirectory, atomic_write_json, atomic_write_text, staged_directory, write_stage_config
from ..options import resume_free
from ..settings import EvaluateCommand, FinetuneCommand, TaskDataSettings
from . import glue, metrics, squad
from .finetune import (FinetuneSettings, RunStore, Task, TeacherLogits, check_distillation, evaluate_split,
                       finetune_model, load_task_data, load_task_model, padding_id, predict_glue, resolve_task,
                       split_score, train_rows)

# Arguments that may change between a run and its --resume without changing the result: the
# options declared ``resume="free"``, and the parser's own entries.
_RESUME_FREE = {"no_progress", "command", "handler", *resume_free(FinetuneCommand, TaskDataSettings, FinetuneSettings)}

# Column order of results tables: the paper's (Table 3), then WNLI and SQuAD v2.0.
_TABLE_ORDER = ("squad", "sst2", "mnli", "mrpc", "cola", "qnli", "qqp", "stsb", "rte", "wnli", "squad_v2")
_TABLE_NAMES = {"squad": "SQuAD1.1 EM/F1", "squad_v2": "SQuAD2.0 EM/F1", "sst2": "SST-2", "mnli": "MNLI-m/mm",
                "mrpc": "MRPC F1/acc", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP F1/acc",
                "stsb": "STS-B P/S", "rte": "RTE", "wnli": "WNLI"}


def resolve_tasks(names: Iterable[str]) -> list[Task]:
    tasks, seen = [], set()
    for name in names:
        task = resolve_task(name)
        if task.name not in seen:
            tasks.append(task)
            seen.add(task.name)
    if not tasks:
        raise UserError("no --task given; name at least one, e.g. --task sst2")
    return tasks


def data_source(data_dir: Path | None, hub: bool, files_given: bool = False) -> Path | None:
    if hub and data_dir is not None:
        raise UserError("pass either --data-dir or --hub, not both")
    if not hub and data_dir is None and not files_given:
        raise UserError("no data: pass --data-dir (classic glue_data layout / SQuAD JSON files) or --hub")
    return data_dir


def load_tokenizer(path: Path, flag: str = "--model", trust_remote_code: bool = False):
    """The tokenizer of a checkpoint folder (``flag`` names where it came from)."""
    from transformers import AutoTokenizer

    with reading(path, flag, "it holds no usable tokenizer; pass --tokenizer DIR", also=(RuntimeError,)):
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _tokenizer(command: Any, model_dir: Path):
    if command.tokenizer:
        return load_tokenizer(command.tokenizer, "--tokenizer", command.trust_remote_code)
    return load_tokenizer(model_dir, "--model", command.trust_remote_code)


# --- finetune ------------------------------------------------------------------------------

def run_finetune(command: FinetuneCommand, source: TaskDataSettings, settings: FinetuneSettings, *,
                 arguments: dict[str, Any] | None = None, teacher_cache: Path | None = None) -> dict:
    """Fine-tune ``command.model`` on each task; returns the run's results (also RUN/results.json).

    ``teacher_cache``: a folder where the teacher's logits on the training rows are kept, so that
    several students of one teacher (develop's targets) record them once."""
    model, out, teacher, test = command.model, Path(command.out), command.teacher, command.test
    resume, overwrite, train_file, dev_file = command.resume, command.overwrite, source.train_file, source.dev_file
    task_list = resolve_tasks(source.tasks)
    check_distillation(settings, bool(teacher), task_list)
    data_dir = data_source(source.data_dir, source.hub, files_given=bool(train_file and dev_file))
    if (train_file or dev_file) and not all(isinstance(t, squad.SquadTask) for t in task_list):
        raise UserError("--train-file / --dev-file name SQuAD JSON files; run GLUE tasks separately")
    # Load and check every task's data before training any: bad input fails in seconds, not hours.
    data = {t.name: load_task_data(t, data_dir, train_file=train_file, dev_file=dev_file, settings=settings, test=test)
            for t in task_list}
    check_checkpoint(model, "--model", command.trust_remote_code)
    for task in task_list if teacher else ():
        check_checkpoint(teacher_model_dir(teacher, task), "--teacher", command.trust_remote_code)
    tok = _tokenizer(command, model)
    work, publish = _work_directory(out, resume, overwrite, arguments or {})
    results = _read_results(work) if resume else _empty_results(model)
    for task in task_list:
        done = work / task.name / "results.json"
        if resume and done.is_file():
            results["tasks"][task.name] = json.loads(done.read_text())
            continue
        record = _finetune_task(model, task, data[task.name], tok, settings, work, teacher, data_dir,
                                command.trust_remote_code, teacher_cache)
        atomic_write_json(done, record)
        results["tasks"][task.name] = record
        _write_results(work, results)
    _write_results(work, results)
    publish()
    return results


def _work_directory(out: Path, resume: bool, overwrite: bool, arguments: dict) -> tuple[Path, Callable[[], None]]:
    """Where the run writes (the rules of `files.RunDirectory`), and how to publish it when done."""
    run_dir = RunDirectory.plan(out, resume=resume, overwrite=overwrite)
    if run_dir.resume:
        _check_same_arguments(run_dir.work / "config.yaml", arguments)
    return run_dir.create(arguments), run_dir.publish


def _check_same_arguments(config_path: Path, arguments: dict) -> None:
    import yaml

    recorded = yaml.safe_load(config_path.read_text()) or {}
    current = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items() if not callable(v)}
    for key in sorted(set(recorded) | set(current)):
        if key in _RESUME_FREE:
            continue
        if recorded.get(key) != current.get(key):
            raise UserError(f"--resume with different arguments: {key} was {recorded.get(key)!r}, now "
                            f"{current.get(key)!r}; rerun with the original arguments or use a new --out")


def _finetune_task(model_path: Path, task: Task, data, tokenizer, settings: FinetuneSettings, out: Path,
                   teacher_path: Path | None, data_dir: Path | None, trust_remote_code: bool = False,
                   teacher_cache: Path | None = None) -> dict:
    store = RunStore(out / task.name)
    model = load_task_model(model_path, task, seed=settings.seed, trust_remote_code=trust_remote_code)
    teacher = None
    if teacher_path and teacher_cache and isinstance(task, glue.GlueTask) and not settings.kd_hidden:
        features = train_rows(task, tokenizer, data.train, settings)
        teacher = TeacherLogits.cached(teacher_model_dir(teacher_path, task), task, features, padding_id(tokenizer),
                                       settings, teacher_cache)
    elif teacher_path:
        teacher = load_task_model(teacher_model_dir(teacher_path, task), task, finetuned=True, flag="--teacher",
                                  trust_remote_code=trust_remote_code)
    result = finetune_model(model, tokenizer, task, data, settings, teacher=teacher, store=store)
    started = time.perf_counter()
    record = {
        "task": task.name, "model": str(model_path), "score": result.score, "scores": result.scores,
        "best_step": result.best_step, "steps": result.steps, "train_examples": result.train_examples,
        "validation_score": result.validation_score,
        "validation_examples": len(data.validation.examples) if data.validation is not None else None,
        "train_features": result.train_features,
        "dev_examples": {name: len(split.examples) for name, split in data.dev.items()},
        "train_seconds": round(result.train_seconds, 1), "history": result.history,
    }
    record["outputs"] = _write_predictions(model, tokenizer, task, data, settings, out, data_dir, result.predictions)
    record["predict_seconds"] = round(time.perf_counter() - started, 1)
    return record


def teacher_model_dir(path: Path, task: Task) -> Path:
    """A teacher model directory, or a finetune run holding `<task>/model`."""
    nested = Path(path) / task.name / "model"
    return nested if nested.is_dir() else Path(path)


def _write_predictions(model, tokenizer, task: Task, data, settings, out: Path, data_dir: Path | None,
                       dev_predictions: dict | None = None) -> list[str]:
    """SQuAD: dev answers (official predictions format). GLUE: submission files for test splits."""
    written = []
    if isinstance(task, squad.SquadTask):
        for name, split in data.dev.items():
            if dev_predictions and name in dev_predictions:
                answers = dev_predictions[name]  # the best evaluation's: no second pass over dev
            else:
                _, answers = evaluate_split(model, tokenizer, task, split, settings)
            path = out / task.name / f"{name}_predictions.json"
            atomic_write_json(path, answers)
            written.append(str(path.relative_to(out)))
        return written
    for name, split in data.test.items():
        path = out / "submission" / f"{task.submission[name]}.tsv"
        write_submission(path, task, split, predict_glue(model, tokenizer, task, split, settings))
        written.append(str(path.relative_to(out)))
    if task.name == "mnli" and data_dir is not None:
        diagnostic = glue.load_diagnostic(data_dir)
        if diagnostic is not None:
            path = out / "submission" / f"{glue.DIAGNOSTIC[2]}.tsv"
            write_submission(path, task, diagnostic, predict_glue(model, tokenizer, task, diagnostic, settings))
            written.append(str(path.relative_to(out)))
    return written


def write_submission(path: Path, task: glue.GlueTask, split, predictions: list) -> None:
    """GLUE server format: a header `index<TAB>prediction`, one row per test example."""
    rows = ["index\tprediction"]
    for number, (example, prediction) in enumerate(zip(split.examples, predictions)):
        rows.append(f"{example.index if example.index is not None else number}\t{glue.submission_value(task, prediction)}")
    atomic_write_text(path, "\n".join(rows) + "\n")


def _empty_results(model: Path) -> dict:
    return {"model": str(model), "tasks": {}}


def _read_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {"tasks": {}}


def _write_results(out: Path, results: dict) -> None:
    scores = {name: record["score"] for name, record in results["tasks"].items()}
    results["glue_average"] = metrics.glue_average(scores)
    results["glue_average_tasks"] = [t for t in metrics.GLUE_AVERAGE_TASKS if t in scores]
    atomic_write_json(out / "results.json", results)


# --- evaluate -------------------------------------------------------------------------------

def run_evaluate(command: EvaluateCommand, source: TaskDataSettings, settings: FinetuneSettings, *,
                 arguments: dict | None = None) -> dict:
    """Score already fine-tuned models: ``command.model`` is one model directory, a finetune run
    (then `<run>/<task>/model` is used per task) or an ONNX file; ``command.onnx`` scores a torch
    model through ONNX Runtime in that form. Writes `out/results.json` when `out` is given."""
    model, out, test, dev_file = command.model, command.out, command.test, source.dev_file
    task_list = resolve_tasks(source.tasks)
    data_dir = data_source(source.data_dir, source.hub, files_given=dev_file is not None)
    # Every model folder and data file is checked before the output folder is made.
    data = {task.name: load_task_data(task, data_dir, train=False, test=test and out is not None, dev_file=dev_file,
                                      settings=settings) for task in task_list}
    if Path(model).suffix != ".onnx":
        for task in task_list:
            check_checkpoint(_task_model_dir(model, task), "--model", command.trust_remote_code)
    if out is None:
        return _evaluate_tasks(command, task_list, data, settings, data_dir, None)
    with staged_directory(out, overwrite=command.overwrite) as work:  # appears complete or not at all
        write_stage_config(work, arguments or {})
        results = _evaluate_tasks(command, task_list, data, settings, data_dir, work)
        _write_results(work, results)
    return results


def _scored_model(command: EvaluateCommand, task: Task, out: Path | None, scratch: Path) -> tuple[Any, Path, str]:
    """(the model to score, its directory, its form): a torch task model, or an ONNX Runtime session
    (`deploy.OnnxTaskModel`) of an ``.onnx`` file or of the model exported in form ``command.onnx``."""
    from ..deploy import OnnxTaskModel, onnx_forms

    model, onnx = command.model, command.onnx
    if Path(model).suffix == ".onnx":
        if not Path(model).is_file():
            raise UserError(f"--model {model} does not exist; point it at an exported ONNX file")
        scored, model_dir, form = OnnxTaskModel(model), Path(model).parent, f"onnx:{Path(model).name}"
    else:
        model_dir = _task_model_dir(model, task)
        scored = load_task_model(model_dir, task, finetuned=True, trust_remote_code=command.trust_remote_code)
        form = "torch"
        if onnx != "none":
            target = (out if out is not None else scratch) / task.name / "onnx"
            scored, form = OnnxTaskModel(onnx_forms(scored, target, (onnx,))[onnx]), f"onnx-{onnx}"
    width = getattr(scored, "num_labels", None)
    if isinstance(scored, OnnxTaskModel) and not isinstance(task, squad.SquadTask) and width not in (None, task.num_labels):
        raise UserError(f"{model} has {width} outputs but {task.name} needs {task.num_labels}; "
                        f"is it fine-tuned on another task?")
    return scored, model_dir, form


def score_forms(model_dir: Path, task: Task, split, settings: FinetuneSettings, forms: Iterable[str], scratch: Path, *,
                trust_remote_code: bool = False) -> dict[str, float]:
    """A fine-tuned model's score on ``split`` in each of ``forms``: ``torch`` (eager fp32) and ONNX
    Runtime's `deploy.ONNX_FORMS` (fp32, optimized, int8; the graphs are written under ``scratch``)."""
    from ..deploy import OnnxTaskModel, onnx_forms

    forms = tuple(forms)
    model = load_task_model(model_dir, task, finetuned=True, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    onnx = tuple(form for form in forms if form != "torch")
    graphs = onnx_forms(model, scratch, onnx) if onnx else {}
    scored = {form: model if form == "torch" else OnnxTaskModel(graphs[form]) for form in forms}
    return {form: split_score(task, evaluate_split(m, tokenizer, task, split, settings)[0]) for form, m in scored.items()}


def _evaluate_tasks(command: EvaluateCommand, task_list, data_by_task, settings, data_dir, out: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="autotinybert-onnx-") as scratch:  # ONNX graphs when there is no --out
        return _evaluate_each(command, task_list, data_by_task, settings, data_dir, out, Path(scratch))


def _evaluate_each(command: EvaluateCommand, task_list, data_by_task, settings, data_dir, out: Path | None,
                   scratch: Path) -> dict:
    results = _empty_results(command.model)
    for task in task_list:
        task_model, model_dir, form = _scored_model(command, task, out, scratch)
        data = data_by_task[task.name]
        tok = _tokenizer(command, model_dir)
        started = time.perf_counter()
        scores = {name: evaluate_split(task_model, tok, task, split, settings)[0] for name, split in data.dev.items()}
        record = {"task": task.name, "model": str(model_dir), "form": form, "scores": scores,
                  "score": scores[task.main_dev_split]["f1"] if isinstance(task, squad.SquadTask)
                  else metrics.task_score(scores[task.main_dev_split]),
                  "dev_examples": {name: len(split.examples) for name, split in data.dev.items()},
                  "eval_seconds": round(time.perf_counter() - started, 1)}
        if out is not None:
            record["outputs"] = _write_predictions(task_model, tok, task, data, settings, out, data_dir)
        results["tasks"][task.name] = record
    scores = {name: r["score"] for name, r in results["tasks"].items()}
    results["glue_average"] = metrics.glue_average(scores)
    results["glue_average_tasks"] = [t for t in metrics.GLUE_AVERAGE_TASKS if t in scores]
    return results


def _task_model_dir(model: Path, task: Task) -> Path:
    nested = Path(model) / task.name / "model"
    if nested.is_dir():
        return nested
    if (Path(model) / "config.json").is_file():
        return Path(model)
    raise UserError(f"--model {model} is neither a model directory (config.json) nor a finetune run with "
                    f"{task.name}/model/; fine-tune it first or point at the right folder")


# --- tables ---------------------------------------------------------------------------------

def results_table(runs: Iterable[Path | dict], names: Iterable[str] | None = None,
                  reference: Path | dict | None = None, reference_name: str | None = None) -> str:
    """A markdown table: one row per model, one column per task (paper order), and the GLUE
    average over the tasks each row has. Runs of the same model (e.g. one finetune run per task
    with its own budget) merge into one row; a later run of a task replaces an earlier one.

    With ``reference`` (e.g. the source model fine-tuned with the same budget) it is the first
    row, and a last column gives each row's mean score over the tasks it shares with the
    reference as a percentage of the reference's mean over the same tasks."""
    rows: dict[str, dict] = {}
    listed = list(zip(runs, names or _NO_NAMES))
    if reference is not None:
        listed.insert(0, (reference, reference_name))
    for run, name in listed:
        results = run if isinstance(run, dict) else _load_results(Path(run))
        label = name or _model_label(results.get("model", str(run)))
        rows.setdefault(label, {}).update(results["tasks"])
    present = {t for tasks in rows.values() for t in tasks}
    columns = [t for t in _TABLE_ORDER if t in present]
    with_glue = any(t in metrics.GLUE_AVERAGE_TASKS for t in present)
    baseline = next(iter(rows.values())) if reference is not None else None
    header = (["model", *(_TABLE_NAMES[t] for t in columns)] + (["GLUE avg"] if with_glue else [])
              + (["% of reference"] if baseline is not None else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, tasks in rows.items():
        cells = [label] + [_cell(t, tasks.get(t)) for t in columns]
        if with_glue:
            average = metrics.glue_average({t: r["score"] for t, r in tasks.items()})
            cells.append("-" if average is None else f"{average:.1f}")
        if baseline is not None:
            share = score_share(tasks, baseline)
            cells.append("-" if share is None else f"{share:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_share(tasks: dict, reference: dict) -> float | None:
    """Mean score over the tasks both have, as a percentage of the reference's mean over them."""
    shared = [t for t in tasks if t in reference]
    ref = sum(reference[t]["score"] for t in shared)
    if not shared or ref <= 0:
        return None
    return 100 * sum(tasks[t]["score"] for t in shared) / ref


class _Nones:
    def __iter__(self):
        while True:
            yield None


_NO_NAMES = _Nones()


def _model_label(model: str) -> str:
    """A short row name: the model folder, or its parent when the folder is just 'model'."""
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else (path.name or model)


def _load_results(path: Path) -> dict:
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no results.json in {path}; point --table at finetune/evaluate --out folders")
    with reading(file, "--table", "point --table at finetune/evaluate --out folders"):
        results = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise UserError(f"{file} is not a finetune/evaluate results file (no 'tasks')")
    return results


def _cell(task: str, record: dict | None) -> str:
    if record is None:
        return "-"
    scores = record["scores"]
    if task.startswith("squad"):
        dev = scores["dev"]
        return f"{dev['exact_match']:.1f}/{dev['f1']:.1f}"
    if task == "mnli":
        return "/".join(f"{scores[s]['accuracy']:.1f}" for s in ("dev_matched", "dev_mismatched") if s in scores)
    return "/".join(f"{value:.1f}" for value in next(iter(scores.values())).values())
