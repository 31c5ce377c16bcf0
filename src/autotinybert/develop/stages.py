"""The eight stages of ``develop``: each reads the run's config and upstream outputs, writes its
own directory, and returns its outputs (``_digest`` names what downstream stages depend on).

Each calls the stage's own function in-process (multi-GPU pre-training launches ``torchrun``
instead, see `_torchrun_pretrain`). Stages read the typed settings ``run.settings``
(`config.DevelopSettings`, built from the config sections through the same declarations the
command line uses) and fill in what only the pipeline knows (paths between stages, the seed) with
`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .. import builtin_data
from .. import settings as S
from ..errors import UserError
from ..files import atomic_write_json
from ..options import to_arguments
from .config import FINAL_RECIPE_ONLY, FURTHER_TRAIN, SOURCE_TEACHER, DevelopSettings
from .manifest import Run, file_hash, stable_hash


def space_of(settings: DevelopSettings):
    """The SuperPLM's search space: the reused checkpoint's, or the configured space within its limits."""
    from ..space import SearchSpace

    if settings.pretrain.reuse:
        return supernet_space(settings.pretrain.reuse)
    limits = settings.pretraining.space_limits
    if settings.start.source:
        from ..pretrained import space_of_source

        return space_of_source(settings.start.source, settings.start.mode).with_limits(**limits)
    return SearchSpace.load(settings.pretraining.space).with_limits(**limits)


def supernet_space(supernet: str | Path):
    """A SuperPLM's space from its config.json (no torch, no weights)."""
    from ..space import SearchSpace

    return SearchSpace.of_checkpoint(Path(supernet), "the SuperPLM")


# --- stage: data ------------------------------------------------------------------------------
def _stage_data(run: Run, out: Path, resume: bool) -> dict:
    data = run.settings.data
    corpus, valid = list(data.corpus), data.valid_corpus
    files: list[Path] = []
    if task_route(run):  # the task route trains on the task's rows only: no corpus to prepare
        corpus, valid = [], []
    elif builtin_data.CORPUS in corpus or valid == [builtin_data.CORPUS]:
        train_file, valid_file = builtin_data.write_python_docs_corpus(out / "corpus")
        files += [train_file, valid_file]
        corpus = [str(train_file) if c == builtin_data.CORPUS else c for c in corpus]
        valid = [str(valid_file)] if valid in (None, [builtin_data.CORPUS]) else valid
    for key, paths in (("corpus", corpus), ("valid_corpus", valid or [])):
        for path in paths:
            if not path.startswith("hf:") and not Path(path).exists():
                raise UserError(f"data.{key}: {path} does not exist; fix the path (or use {builtin_data.CORPUS})")
    if not valid and not task_route(run):
        raise UserError("data.valid_corpus: give held-out text files (validation, and the search's proxy evaluator "
                        "scores architectures on them)")
    tasks_dir = data.tasks_dir
    if tasks_dir == builtin_data.TASK:
        tasks_dir = str(builtin_data.write_vader_task(out / "tasks"))
        files += sorted((out / "tasks").rglob("*.tsv"))
    elif run.settings.task_data.tasks and (tasks_dir is None or not Path(tasks_dir).is_dir()):
        raise UserError(f"data.tasks_dir: {tasks_dir} is not a directory; give the glue_data folder "
                        f"(or {builtin_data.TASK}), or set finetune.tasks: []")
    outputs = {"corpus": corpus, "valid_corpus": valid, "tasks_dir": tasks_dir,
               "builtin_task": data.tasks_dir == builtin_data.TASK}
    outputs["_digest"] = file_hash(files) if files else stable_hash(outputs)
    return outputs


# --- stage: pretrain ------------------------------------------------------------------------
def _pretrain_settings(run: Run, out: Path, further: bool = False, **changes: Any) -> S.PretrainSettings:
    """`PretrainSettings` of the ``pretrain`` section (with ``further``: the ``further_train``
    section's training options on top), the data stage's corpus and the run's seed."""
    s, data = run.settings, run.outputs["data"]
    settings = s.pretraining
    if further:
        settings = dataclasses.replace(settings, **{k: getattr(s.further_training, k) for k in FURTHER_TRAIN})
    return dataclasses.replace(settings, out=str(out), corpus=data["corpus"], valid_corpus=data["valid_corpus"],
                               seed=s.run.seed, cache_dir=s.data.cache_dir, progress=s.run.progress,
                               trust_remote_code=s.run.trust_remote_code,
                               teacher=_teacher_of(run, settings.teacher, needed=settings.objective in ("kd", "both")),
                               **changes)


def _stage_pretrain(run: Run, out: Path, resume: bool) -> dict:
    from ..evaluators import file_digest
    from ..pretrain import CHECKPOINT_DIR, pretrain

    if task_route(run):
        return _stage_task_superplm(run, out, resume)
    reuse = run.settings.pretrain.reuse
    if reuse:
        if not (Path(reuse) / "model.safetensors").is_file():
            raise UserError(f"pretrain.reuse: {reuse} is not a SuperPLM checkpoint (no model.safetensors)")
        return {"supernet": str(Path(reuse).absolute()), "reused": True,
                "_digest": file_digest(Path(reuse) / "model.safetensors")}
    again = (out / CHECKPOINT_DIR / "trainer_state.json").is_file()
    start = _pretrained_start(run, out.with_name("pretrain_start"), again) if run.settings.start.source else {}
    settings = _pretrain_settings(run, out, **start)
    if run.settings.pretrain.nproc_per_node > 1:
        _torchrun_pretrain(run, settings, again)
        summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    else:
        if not again:
            shutil.rmtree(out, ignore_errors=True)
        summary = pretrain(settings, resume=again)
    return {"supernet": str(out), "steps": summary["steps"], "_digest": summary["weights_digest"]}


# --- the task route's pretrain stage: teacher, then the task SuperPLM ------------------------------------
def task_route(run: Run) -> bool:
    return run.settings.task.enabled


def route_task(run: Run):
    """The one task of the task route."""
    from ..tasks.finetune import resolve_task

    return resolve_task(run.settings.task_data.tasks[0])


def _task_data_settings(run: Run) -> S.TaskDataSettings:
    return dataclasses.replace(run.settings.task_data, data_dir=Path(run.outputs["data"]["tasks_dir"]))


def _finetune_settings(run: Run, **changes: Any) -> S.FinetuneSettings:
    """The finetune section's settings on the run's device (with the task route's distillation)."""
    s = run.settings
    distillation = s.distillation if task_route(run) else S.FinetuneSettings()
    return dataclasses.replace(s.finetuning, progress=s.run.progress, device=s.run.device,
                               kd_alpha=distillation.kd_alpha, kd_temperature=distillation.kd_temperature, **changes)


def _teacher_run(run: Run) -> Path:
    """The fine-tuned source: task.teacher, or pretrain.init_from fine-tuned on the task into RUN/teacher
    (selected on the carved validation rows; resumed when interrupted)."""
    from ..builtin_data import resolve_model
    from ..tasks.run import run_finetune

    given = run.settings.task.teacher
    if given:
        return Path(given)
    out, task = run.out / "teacher", route_task(run)
    if not (out / task.name / "results.json").is_file():
        source = resolve_model(run.settings.start.source)
        run.log(f"  teacher: fine-tune {source} on {task.name}")
        command = S.FinetuneCommand(model=Path(source), out=out, test=False, resume=(out / "config.yaml").is_file(),
                                    trust_remote_code=run.settings.run.trust_remote_code)
        run_finetune(command, _task_data_settings(run), _finetune_settings(run),
                     arguments={"model": source, **run.config["finetune"]})
    return out


def _stage_task_superplm(run: Run, out: Path, resume: bool) -> dict:
    """The teacher made elastic (RUN/pretrain_start) and trained on its task (RUN/pretrain). A fresh
    attempt (changed inputs) redoes the teacher and the start too; a resumed one continues them."""
    from .. import task_supernet
    from ..checkpoint import load_supernet, load_tokenizer, save_supernet
    from ..evaluators import file_digest
    from ..files import staged_directory
    from ..tasks import finetune
    from ..tasks.run import teacher_model_dir

    if not resume:
        for stale in (run.out / "teacher", out.with_name("pretrain_start")):
            shutil.rmtree(stale, ignore_errors=True)
    task = route_task(run)
    teacher = teacher_model_dir(_teacher_run(run), task)
    settings = dataclasses.replace(run.settings.task_superplm, seed=run.settings.run.seed)
    budget = run.settings.task_budget
    ft = _finetune_settings(run, epochs=budget.epochs, max_steps=budget.max_steps, learning_rate=budget.learning_rate,
                            max_train_examples=budget.max_train_examples)
    data = finetune.load_task_data(task, Path(run.outputs["data"]["tasks_dir"]), test=False, settings=ft)
    start = out.with_name("pretrain_start")
    if not (start / "results.json").is_file():
        tokenizer = load_tokenizer(teacher)
        run.log(f"  task SuperPLM from {teacher} ({settings.mode} space, {settings.importance} importance, "
                f"{settings.depth_order} depth order)")
        model, summary = task_supernet.task_superplm_from_source(
            teacher, task, tokenizer, finetune.train_features(task, tokenizer, data.train, ft), settings,
            run.settings.run.trust_remote_code)
        with staged_directory(start, overwrite=True) as tmp:
            save_supernet(model, tmp)
            tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / "results.json", summary)
    model, tokenizer = load_supernet(start), load_tokenizer(start)
    features = finetune.train_features(task, tokenizer, data.train, ft)
    logits = finetune.TeacherLogits.cached(teacher, task, features, finetune.padding_id(tokenizer), ft, start)
    run.log(f"  train every sub-model on {task.name} ({len(features)} rows, sandwich of "
            f"{2 + settings.random_sub_models}, KD from the teacher's logits)")
    summary = task_supernet.train(model, tokenizer, task, data, logits, ft, settings, out)
    save_supernet(model, out)
    tokenizer.save_pretrained(str(out))
    atomic_write_json(out / "results.json", {**summary, "teacher": str(teacher), "start": str(start)})
    return {"supernet": str(out), "teacher": str(teacher), "steps": summary["steps"],
            "_digest": file_digest(out / "model.safetensors")}


def _teacher_of(run: Run, teacher: str | None, needed: bool = True) -> str | None:
    """A section's teacher, where `SOURCE_TEACHER` (no teacher named, a pre-trained start) is the
    source when ``needed``: it teaches its SuperPLM and scores the proxy's kd_loss."""
    from ..builtin_data import resolve_model

    if teacher != SOURCE_TEACHER:
        return teacher
    return resolve_model(run.settings.start.source) if needed else None


def _pretrained_start(run: Run, start: Path, again: bool) -> dict[str, Any]:
    """``init --from`` the configured source into RUN/pretrain_start (once per attempt chain), and
    the pre-training settings that continue from it: its weights, space and tokenizer."""
    from ..pretrained import init_from_source

    init = run.settings.start
    if not (again and (start / "model.safetensors").is_file()):
        shutil.rmtree(start, ignore_errors=True)
        run.log(f"  start from {init.source} ({init.mode} space, {init.importance} importance)")
        init_from_source(dataclasses.replace(init, out=start, calibration_corpus=run.outputs["data"]["corpus"],
                                             seed=run.settings.run.seed, overwrite=True))
    return {"init": str(start), "space": str(start), "tokenizer": str(start), "vocab_size": None}


def _torchrun_pretrain(run: Run, settings, resume: bool) -> None:
    """Several processes cannot share this one: launch ``torchrun -m autotinybert pretrain``."""
    p = run.settings.pretrain
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p.nproc_per_node}",
               *map(str, p.torchrun_args), "-m", "autotinybert", "pretrain", *pretrain_arguments(settings)]
    if resume:
        command.append("--resume")
    run.log("  " + " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise UserError(f"torchrun pretrain exited with code {code}; see its output above, fix it and rerun "
                        "develop (it continues from the last checkpoint)")


def pretrain_arguments(settings) -> list[str]:
    """The `autotinybert pretrain` command line equivalent to ``settings`` (derived from its declaration)."""
    return to_arguments(settings)


# --- stage: latency ---------------------------------------------------------------------------
def _stage_latency(run: Run, out: Path, resume: bool) -> dict:
    from ..latency import LatencyPredictor, settings_of

    s = run.settings
    reuse = s.latency.reuse
    if reuse:
        predictor = LatencyPredictor.load(reuse)  # warns when fitted on another device
        return {"predictor": str(Path(reuse).absolute()), "reused": True, "reference_ms": predictor.reference_ms,
                "predictors": {settings_of(predictor.fingerprint).form: str(Path(reuse).absolute())},
                "_digest": file_hash([Path(reuse)])}
    forms = deployed_timings(s.timing, _onnx_available()) if s.latency.form == "auto" else {s.timing.form: s.timing}
    records = {form: _profile_and_fit(run, out if len(forms) == 1 else out / form, timing)
               for form, timing in forms.items()}
    first = next(iter(records.values()))  # the configured form (auto: torch fp32, until the search chooses)
    return {**first, "predictors": {form: r["predictor"] for form, r in records.items()},
            "_digest": file_hash([Path(r["predictor"]) for r in records.values()])}


def _profile_and_fit(run: Run, out: Path, settings: S.LatencySettings) -> dict:
    """The space profiled in one deployed form (resumed from its JSONL) and its predictor fitted."""
    from ..latency import fit, profile

    s = run.settings
    data = out / "profile.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    profile(space_of(s), s.profile.samples, data, settings, seed=s.run.seed, resume=data.is_file(),
            progress=s.run.progress, drift_anchor=s.profile.drift_anchor)
    predictor, report = fit(data, holdout=s.fit.holdout, seed=s.run.seed, hidden=s.fit.hidden, epochs=s.fit.epochs,
                            folds=s.fit.folds)
    predictor.save(out / "predictor.json")
    atomic_write_json(out / "results.json", report)
    run.log(f"  predictor ({settings.form}): {report['chosen']} chosen by cross-validation, held-out MAPE "
            f"{report['selected']['mape_pct']:.1f}% (MLP {report['mlp']['mape_pct']:.1f}%, FLOPs "
            f"{report['baseline']['mape_pct']:.1f}%), BERT-base {predictor.reference_ms:.1f} ms")
    return {"predictor": str(out / "predictor.json"), "profile": str(data), "reference_ms": predictor.reference_ms,
            "mape_pct": report["selected"]["mape_pct"], "form": settings.form}


# --- stage: search ----------------------------------------------------------------------------
def search_targets_ms(search: S.SearchStage, targets: S.TargetSettings, predictor, space) -> list[float]:
    """``target_ms``, one target per ``source_speedups`` entry (the source's predicted latency / s),
    and one per ``range_fractions`` entry f: the latency f of the way from
    the space's fastest architecture to its slowest, as predicted (0: smallest, 1: largest). Such
    targets mean the same on every machine and always fall inside the space (demos, CI)."""
    low, high = predictor.predict(space.smallest()), predictor.predict(space.largest())
    return ([float(ms) for ms in targets.target_ms] + [round(low + f * (high - low), 3) for f in search.range_fractions]
            + [round(high / s, 3) for s in search.source_speedups])  # the largest = the pre-trained source


def _stage_search(run: Run, out: Path, resume: bool) -> dict:
    from ..latency import LatencyPredictor
    from ..search_stage import SearchJob, run_search_stage

    s, data = run.settings, run.outputs["data"]
    again = (out / "state.json").is_file()
    if not again:
        shutil.rmtree(out, ignore_errors=True)
    supernet = Path(run.outputs["pretrain"]["supernet"])
    form = _choose_searched_form(run, out / "form.json", supernet)
    predictor_file = Path(run.outputs["latency"]["predictors"][form["form"]])
    predictor = LatencyPredictor.load(predictor_file, check_fingerprint=False)
    target_ms = search_targets_ms(s.search, s.targets, predictor, supernet_space(supernet))
    route = task_route(run)
    job = SearchJob(
        command=dataclasses.replace(s.search_command, supernet=supernet, predictor=predictor_file, out=out,
                                    device=s.run.device, resume=again, progress=s.run.progress),
        targets=dataclasses.replace(s.targets, target_ms=target_ms),
        search=dataclasses.replace(s.search_method, seed=s.run.seed),
        proxy=dataclasses.replace(s.proxy, trust_remote_code=s.run.trust_remote_code,
                                  teacher=_teacher_of(run, s.proxy.teacher)),
        proxy_data=S.ProxyDataCommand(valid_corpus=data["valid_corpus"], cache_dir=s.data.cache_dir,
                                      seq_len=s.pretraining.seq_len),
        tasks=dataclasses.replace(s.task_data, data_dir=data["tasks_dir"]),
        budget=_search_budget(run),
        task_eval=S.TaskEvaluatorSettings(rerank=s.task_evaluator.rerank if route else 0,
                                          rerank_teacher=Path(run.outputs["pretrain"]["teacher"]) if route else None))
    summary = run_search_stage(job, arguments={"develop": True, **run.config["search"], "target_ms": target_ms})
    atomic_write_json(out / "form.json", form)
    best = {row["target"]: row["arch"] for row in summary["best"]}
    for row in summary["best"]:
        run.log(f"  {row['target']:>10}: {row['arch']} ({row['latency_ms']:.2f} ms predicted, fitness {row['fitness']:.4f})")
    verified = _verify_shortlists(run, out, summary, predictor, job) if s.search.verify else None
    if verified is not None:
        best = {row["target"]: row["arch"] for row in verified["targets"]}
    return {"results": str(out / "results.json"), "best": best, "predictor": str(predictor_file), "form": form,
            "verify": str(out / "verify.json") if verified is not None else None,
            "_digest": stable_hash([best, form["form"]])}


def _choose_searched_form(run: Run, path: Path, supernet: Path) -> dict[str, Any]:
    """The deployed form the search times (``path``: its record once the search has run; the search
    writes its folder itself, so a resumed search that had not finished chooses again, the same way).
    With one profiled form, that one; with latency.form auto, `verify.choose_form` over the forms'
    predicted latency of the largest architecture and, on the task route, the teacher's score on
    the carved validation rows in each form (elsewhere nothing is scored yet, so int8 is not chosen)."""
    import tempfile

    from ..latency import LatencyPredictor
    from ..verify import choose_form

    predictors = run.outputs["latency"]["predictors"]
    if len(predictors) == 1:
        form = next(iter(predictors))
        return {"form": form, "reason": "the latency section's form (latency.form: configured)"}
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    reference = supernet_space(supernet).largest()
    latency = {form: LatencyPredictor.load(p, check_fingerprint=False).predict(reference)
               for form, p in predictors.items()}
    scores = {}
    if task_route(run):
        with tempfile.TemporaryDirectory(prefix="autotinybert-forms-") as graphs:
            scores = _teacher_form_scores(run, list(predictors), Path(graphs))
    choice = {**choose_form(latency, scores, run.settings.finetune.form_tolerance), "reference": str(reference),
              "reference_ms": latency, "scores": scores}
    if choice["form"] is None:
        raise UserError("latency.form auto: no deployed form could be chosen; set latency.form: configured")
    choice["reason"] = f"the largest architecture predicted at {choice['reason']}"
    run.log(f"  search in form {choice['form']}: {choice['reason']}"
            + (f" (teacher on the carved rows: {', '.join(f'{f} {v:.2f}' for f, v in scores.items())})" if scores else ""))
    return choice


def _teacher_form_scores(run: Run, forms: list[str], scratch: Path) -> dict[str, float]:
    """The teacher's score on the carved validation rows in each deployed form: whether a form keeps
    the task's accuracy, measured before the search and without dev."""
    from ..tasks import finetune
    from ..tasks.run import score_forms

    task, settings = route_task(run), _finetune_settings(run)
    data = finetune.load_task_data(task, Path(run.outputs["data"]["tasks_dir"]), test=False, settings=settings)
    scored = score_forms(Path(run.outputs["pretrain"]["teacher"]), task, data.validation, settings,
                         [SCORED_AS[form] for form in forms], scratch,
                         trust_remote_code=run.settings.run.trust_remote_code)
    return {form: round(scored[SCORED_AS[form]], 4) for form in forms}


def _timing(run: Run, predictor, **timing: Any):
    """`LatencySettings` of the predictor's deployed form, with the latency section's robustness
    settings (tolerance, max_repeats, noise_limit) and the given ``timing``."""
    from ..latency import settings_of

    t = run.settings.timing
    return settings_of(predictor.fingerprint, **timing, tolerance=t.tolerance, max_repeats=t.max_repeats,
                       noise_limit=t.noise_limit)


def _verify_shortlists(run: Run, out: Path, summary: dict, predictor, job) -> dict | None:
    """Each target's best few timed side by side with the largest architecture (`verify`); what ships
    is the best whose measured speed-up meets its target (within `verify.OVERSHOOT` when one does);
    with search.correct, a target outside that band is searched again with the predictor's measured
    bias there removed (`_correct`). Writes ``out/verify.json``. Skipped (the predicted best ships)
    when the predictor was fitted on another device: nothing here can time that device."""
    from ..verify import measure_against, verify_targets

    if predictor.check_fingerprint():  # it warned, naming the differences
        run.log("  verify: skipped (the predictor was fitted on another device); the predicted best ships")
        return None
    count = run.settings.search.verify
    settings = _timing(run, predictor, warmup=run.settings.timing.warmup, repeats=run.settings.timing.repeats)
    targets = [{"target": t["target"]["name"], "target_ms": t["target"]["ms"], "visits": t["history"]}
               for t in summary["targets"]]
    reference = supernet_space(job.command.supernet).largest()
    run.log(f"  verify: each target's {count} best timed side by side with {reference} ({settings.form})")
    measure = measure_against(settings)

    def verify(targets: list[dict]) -> dict:
        return verify_targets(targets, reference, predictor.predict, count, measure, form=settings.form)

    verified = verify(targets)
    if run.settings.search.correct:
        verified = _correct(run, out / "corrected", verified, job, verify)
    for row in verified["targets"]:
        shipped = next(c for c in row["candidates"] if c["arch"] == row["arch"])
        run.log(f"  {row['target']:>10}: ships {row['arch']}, measured {shipped['measured_speedup']:.2f}x the "
                f"largest (target {row['target_speedup']:.2f}x, predicted {shipped['predicted_speedup']:.2f}x)"
                + ("" if row["met"] else f": NO candidate met the target; the nearest is {row['shortfall_pct']:.1f}% short"))
    atomic_write_json(out / "verify.json", verified)
    return verified


def _correct(run: Run, out: Path, verified: dict, job, verify: Callable[[list[dict]], dict]) -> dict:
    """Each target whose verified model is outside the band, searched again (``out/<target>``,
    resumable) for its budget divided by the predictor's measured bias there
    (`verify.corrected_target_ms`), in a window that is the band itself (a first search's window
    reaches 15 % below its budget: a model can overshoot with no bias at all); the new shortlist is
    verified against the same target and what ships is chosen from both rounds. A corrected budget
    outside the space keeps the first round."""
    from ..search_stage import run_search_stage
    from ..verify import OVERSHOOT, corrected_target_ms, merge_correction

    rows = []
    for row in verified["targets"]:
        if row["in_band"]:
            rows.append(row)
            continue
        budget = corrected_target_ms(row)
        run.log(f"  correct {row['target']}: searched again for {budget:.3f} ms predicted (measured / predicted "
                f"{row['target_ms'] / budget:.3f} where its candidates lie)")
        folder = out / _safe(row["target"])
        again = (folder / "state.json").is_file()
        if not again:
            shutil.rmtree(folder, ignore_errors=True)
        corrected_job = dataclasses.replace(
            job, command=dataclasses.replace(job.command, out=folder, resume=again, plot=False),
            targets=dataclasses.replace(job.targets, speedups=[], target_ms=[budget]),
            search=dataclasses.replace(job.search, window=(round(1 / (1 + OVERSHOOT), 4), 1.0)))
        try:
            (searched,) = run_search_stage(corrected_job, arguments={"develop": True, "corrected": budget})["targets"]
        except UserError as err:  # e.g. no architecture of the space lies in the corrected window
            run.log(f"  correct {row['target']}: kept the first round ({err})")
            rows.append(row)
            continue
        (second,) = verify([{"target": row["target"], "target_ms": row["target_ms"], "visits": searched["history"]}])[
            "targets"]
        rows.append(merge_correction(row, second, budget, verified["reference"]["predicted_ms"]))
    return {**verified, "targets": rows}


def _search_budget(run: Run) -> S.FinetuneBudget:
    """The search's ft_* budget; the task route scores candidates on the finetune section's carved
    validation rows unless search.ft_validation_examples names its own number."""
    budget = run.settings.search_budget
    if not task_route(run) or budget.validation_examples:
        return budget
    return dataclasses.replace(budget, validation_examples=run.settings.finetuning.validation_examples)


# --- stage: extract ---------------------------------------------------------------------------
def _stage_extract(run: Run, out: Path, resume: bool) -> dict:
    from ..export import export_checkpoint

    e = run.settings.export
    onnx = _exports_onnx(run)
    models = {}
    for target, arch in run.outputs["search"]["best"].items():
        model_dir = out / _safe(target)
        if not (model_dir / "results.json").is_file():
            run.log(f"  {target}: extract {arch}" + (" (+ ONNX)" if onnx else ""))
            export_checkpoint(run.outputs["pretrain"]["supernet"], arch, model_dir, onnx=onnx, verify=e.verify,
                              onnx_optimize=onnx and e.onnx_optimize, onnx_int8=onnx and e.onnx_int8, overwrite=True)
        models[target] = {"arch": arch, "path": str(model_dir)}
    reference = _reference(run, out / "reference")
    _measure_side_by_side(run, {Path(m["path"]): m["arch"] for m in models.values()}, reference["arch"],
                          out / "reference")
    return {"models": models, "reference": reference if run.settings.start.source else None,
            "_digest": file_hash([out / _safe(t) / "model.safetensors" for t in models])}


def _reference(run: Run, out: Path) -> dict:
    """The largest architecture, every model's timing reference; with a pre-trained start it is the
    source, which the report compares with: its architecture, parameters and measured latency
    (RUN/extract/reference/latency.json)."""
    from ..builtin_data import resolve_model
    from ..space import parameter_count

    source = run.settings.start.source
    supernet = run.outputs["pretrain"]["supernet"]
    arch = supernet_space(supernet).largest()
    config = json.loads((Path(supernet) / "config.json").read_text(encoding="utf-8"))
    parameters = parameter_count(arch, config["vocab_size"], config["max_position_embeddings"])
    return {"arch": str(arch), "path": resolve_model(source) if source else None, "name": source or "largest",
            "latency": str(out / "latency.json"), "parameters": parameters}


def _measure_side_by_side(run: Run, models: dict[Path, str], reference: str, reference_dir: Path) -> None:
    """Every exported model and the reference timed together in one interleaved run per form (the
    searched form and each of `DEPLOYED_FORMS`): each model's ``speedup`` is the median over rounds
    of the reference's time / its time in the same round, the number a user's side-by-side timing
    gives (absolute times drift with the host; ratios of one run do not). Writes each model's
    latency.json and the reference's; kept when all are there (a resumed run)."""
    files = {directory / "latency.json": arch for directory, arch in models.items()}
    files[reference_dir / "latency.json"] = reference
    if all(path.is_file() for path in files):
        return
    run.log(f"  measure {len(models)} model(s) side by side with the reference {reference}")
    records = measure_exported(run, list(dict.fromkeys(files.values())), reference)
    for path, arch in files.items():
        atomic_write_json(path, records[arch])


# The forms a model ships in, each timed side by side with the reference: torch eager fp32 and, when
# ONNX Runtime is there, its optimised fp32 and int8 graphs (the int8 one is what
# `finetune.int8_eval` scores).
DEPLOYED_FORMS = ({"engine": "torch"}, {"engine": "onnxruntime", "optimize": True},
                  {"engine": "onnxruntime", "optimize": True, "quantize": "int8"})
# Each deployed form (a latency form name) as `tasks.run.score_forms` scores it.
SCORED_AS = {"torch": "torch", "onnxruntime-opt": "optimized", "onnxruntime-opt-int8": "int8"}


def deployed_timings(base: S.LatencySettings, onnx: bool) -> dict[str, S.LatencySettings]:
    """``base`` (its shapes, clock and robustness settings) in each of `DEPLOYED_FORMS`, by form name;
    ONNX Runtime's only when ``onnx``."""
    forms = (dataclasses.replace(base, **{"optimize": False, "quantize": "none", **shape}) for shape in DEPLOYED_FORMS)
    return {form.form: form for form in forms if form.engine == "torch" or onnx}


def measure_exported(run: Run, archs: list[str], reference: str) -> dict[str, dict]:
    """Measured latency of exported architectures in the predictor's (searched) form, next to their
    predictions, each form timed in one interleaved run with ``reference`` in every round; ``forms``
    has every deployed form (`DEPLOYED_FORMS`; ONNX Runtime's where the run exports ONNX), timed the same
    way. Each record has ``speedup`` (measured, over ``reference``), ``predicted_speedup`` and their
    signed ``speedup_error_pct`` (negative: slower than predicted)."""
    from ..latency import LatencyPredictor, measure_many
    from ..space import Arch
    from ..verify import speedups

    predictor = LatencyPredictor.load(run.outputs["search"]["predictor"], check_fingerprint=False)
    searched = _timing(run, predictor, warmup=3, repeats=run.settings.extract.latency_repeats,
                       interleave=len(archs))
    forms = {searched.form: searched, **deployed_timings(searched, _exports_onnx(run))}
    timed = {name: {r["arch"]: r for r in measure_many(archs, form, anchor=Arch.parse(reference))}
             for name, form in forms.items()}
    reference_predicted = predictor.predict(reference)
    records = {}
    for arch in archs:
        record = timed[searched.form][arch]
        ratios = speedups(predictor.predict(arch) / reference_predicted, record["paced"]["ratio"])
        records[arch] = {**record, "predicted_ms": predictor.predict(arch), "reference_ms": predictor.reference_ms,
                         "form": searched.form, "reference_arch": reference, "speedup": ratios["measured_speedup"],
                         "predicted_speedup": ratios["predicted_speedup"], "speedup_error_pct": ratios["error_pct"],
                         "forms": {name: {**timed[name][arch]["latency"],
                                          "speedup": round(1 / timed[name][arch]["paced"]["ratio"], 4)}
                                   for name in forms}}
    return records


def _safe(name: str) -> str:
    return "target-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def _exports_onnx(run: Run) -> bool:
    """extract.onnx resolved: whether this run writes (and times) ONNX forms."""
    return _when_onnx(run.settings.extract.onnx)


def _when_onnx(value: bool | str) -> bool:
    """An ONNX switch (true, false or auto): ``auto`` is on when onnx, onnxruntime and onnxscript import."""
    return _onnx_available() if value == "auto" else bool(value)


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
    from ..pretrain import CHECKPOINT_DIR, pretrain

    steps, objective = run.settings.further_train.max_steps, run.settings.further_training.objective
    extracted = run.outputs["extract"]["models"]
    if task_route(run):
        return _final_recipe(run, out, extracted)
    if steps == 0:  # the inherited weights are the final ones
        return {"models": {t: {**m, "source": m["path"]} for t, m in extracted.items()}, "skipped": True,
                "_digest": run.digests["extract"]}
    models, digests = {}, []
    for target, model in extracted.items():
        target_dir = out / _safe(target)
        if not (target_dir / "results.json").is_file():
            run.log(f"  {target}: further-train {model['arch']} for {steps} steps ({objective})")
            settings = _pretrain_settings(run, target_dir, further=True, arch=model["arch"],
                                          init=model["path"], tokenizer=None, vocab_size=None, max_steps=steps)
            again = (target_dir / CHECKPOINT_DIR / "trainer_state.json").is_file()
            if run.settings.pretrain.nproc_per_node > 1:
                _torchrun_pretrain(run, settings, again)
            else:
                pretrain(settings, resume=again)
        summary = json.loads((target_dir / "results.json").read_text(encoding="utf-8"))
        models[target] = {"arch": model["arch"], "path": str(target_dir / "exported"), "source": model["path"],
                          "run": str(target_dir)}
        digests.append(summary["weights_digest"])
    return {"models": models, "_digest": stable_hash(digests)}


def _final_recipe(run: Run, out: Path, extracted: dict) -> dict:
    """The task route's last training: each extracted model (task head inherited) trained by task KD
    from the teacher's recorded logits (and, with task.kd_hidden, its hidden states; with
    task.augment_copies, on teacher-labelled copies too), its checkpoint picked on the carved rows."""
    from ..tasks.run import run_finetune

    task, teacher = route_task(run), Path(run.outputs["pretrain"]["teacher"])
    models, digests = {}, []
    for target, model in extracted.items():
        target_dir = out / _safe(target)
        if not (target_dir / task.name / "results.json").is_file():
            run.log(f"  {target}: task KD of {model['arch']} from the teacher")
            command = S.FinetuneCommand(model=Path(model["path"]), out=target_dir, teacher=teacher, test=False,
                                        resume=(target_dir / "config.yaml").is_file(),
                                        trust_remote_code=run.settings.run.trust_remote_code)
            final = {name: getattr(run.settings.distillation, name) for name in FINAL_RECIPE_ONLY}
            run_finetune(command, _task_data_settings(run), _finetune_settings(run, **final),
                         arguments={"model": model["path"], "teacher": str(teacher), **final, **run.config["finetune"]},
                         teacher_cache=out)
        results = json.loads((target_dir / "results.json").read_text(encoding="utf-8"))
        models[target] = {"arch": model["arch"], "path": str(target_dir / task.name / "model"), "source": model["path"],
                          "run": str(target_dir)}
        digests.append(results["tasks"][task.name]["score"])
    return {"models": models, "_digest": stable_hash(digests)}


# --- stage: finetune ---------------------------------------------------------------------------
def _stage_finetune(run: Run, out: Path, resume: bool) -> dict:
    from ..tasks.run import run_evaluate, run_finetune

    f, tasks = run.config["finetune"], run.settings.task_data.tasks
    if not tasks:
        return {"runs": {}, "_digest": ""}
    if task_route(run):
        return _score_route_models(run, out)
    settings, source = _finetune_settings(run), _task_data_settings(run)
    runs, digests = {}, []
    models = dict(run.outputs["further_train"]["models"])
    reference = run.outputs["extract"].get("reference")
    if reference:  # the source, fine-tuned with the same budget: what the searched models are measured against
        models["source"] = reference
    for target, model in models.items():
        target_dir = out / _safe(target)
        if not _finished(target_dir, tasks):
            run.log(f"  {target}: fine-tune {model['arch']} on {', '.join(tasks)}")
            command = S.FinetuneCommand(model=Path(model["path"]), out=target_dir, test=False,
                                        resume=(target_dir / "config.yaml").is_file(),
                                        trust_remote_code=run.settings.run.trust_remote_code)
            run_finetune(command, source, settings, arguments={"model": model["path"], **f})
        int8_dir = target_dir / INT8_EVAL
        if _int8_eval(run) and not (int8_dir / "results.json").is_file():
            run.log(f"  {target}: score the int8 ONNX Runtime form on {', '.join(tasks)}")
            run_evaluate(S.EvaluateCommand(model=target_dir, out=int8_dir, onnx="int8", test=False, overwrite=True),
                         source, settings, arguments={"model": str(target_dir), "onnx": "int8"})
        results = json.loads((target_dir / "results.json").read_text(encoding="utf-8"))
        runs[target] = str(target_dir)
        digests.append({t: r["score"] for t, r in results["tasks"].items()})
    return {"runs": runs, "_digest": stable_hash(digests)}


def _score_route_models(run: Run, out: Path) -> dict:
    """The task route's models are trained already: score each, and the teacher (the fine-tuned
    source, the reference), on dev in fp32 and in the int8 ONNX Runtime form."""
    from ..tasks.run import run_evaluate

    task = route_task(run)
    models = {t: m["run"] for t, m in run.outputs["further_train"]["models"].items()}
    models["source"] = str(_teacher_run(run))
    settings, runs, digests = _finetune_settings(run), {}, []
    for target, trained in models.items():
        target_dir = out / _safe(target)
        for form, directory in (("none", target_dir), ("int8", target_dir / INT8_EVAL)):
            if (directory / "results.json").is_file() or (form == "int8" and not _int8_eval(run)):
                continue
            run.log(f"  {target}: score on {task.name} dev" + (" (int8 ONNX Runtime)" if form == "int8" else ""))
            run_evaluate(S.EvaluateCommand(model=Path(trained), out=directory, onnx=form, test=False, overwrite=True),
                         _task_data_settings(run), settings, arguments={"model": trained, "onnx": form})
        runs[target] = str(target_dir)
        digests.append(json.loads((target_dir / "results.json").read_text(encoding="utf-8"))["tasks"][task.name]["score"])
    return {"runs": runs, "_digest": stable_hash(digests)}


INT8_EVAL = "int8-eval"  # <finetune run>/int8-eval/results.json: the int8 ONNX Runtime form's dev scores


def _int8_eval(run: Run) -> bool:
    return _when_onnx(run.settings.finetune.int8_eval)


def _finished(target_dir: Path, tasks: list[str]) -> bool:
    from ..tasks.run import resolve_tasks

    path = target_dir / "results.json"
    if not path.is_file():
        return False
    done = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
    return all(t.name in done for t in resolve_tasks(tasks))


# --- stage: report -----------------------------------------------------------------------------
def _stage_report(run: Run, out: Path, resume: bool) -> dict:
    from ..report import build_report

    run.save_manifest()  # the report reads the manifest's costs and outputs
    paths = build_report(run.out, out, title=run.settings.report.title)
    return {**{k: str(v) for k, v in paths.items()}, "_digest": ""}


_STAGE_FUNCTIONS: dict[str, Callable[[Run, Path, bool], dict]] = {
    "data": _stage_data, "pretrain": _stage_pretrain, "latency": _stage_latency, "search": _stage_search,
    "extract": _stage_extract, "further_train": _stage_further_train, "finetune": _stage_finetune,
    "report": _stage_report,
}
