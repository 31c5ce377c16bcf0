"""The `search` stage: wires the SuperPLM evaluator and the latency predictor to the pure search.

Writes into ``--out``: ``config.yaml`` (arguments), ``state.json`` (every evaluation, rewritten
after each), ``results.json``, ``best.json`` and ``pareto.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import SetupWarning, UserError
from .files import atomic_write_json, write_stage_config
from .search import (
    check_method,
    find_candidates,
    make_targets,
    read_state,
    rerank,
    search,
    search_grid,
    state_header,
    write_outputs,
)
from .settings import (
    FinetuneBudget,
    FinetuneSettings,
    ProxyDataCommand,
    ProxySettings,
    SearchCommand,
    SearchSettings,
    TargetSettings,
    TaskDataSettings,
    TaskEvaluatorSettings,
)
from .space import SearchSpace


@dataclass
class SearchJob:
    """Everything a search (or `search correlate`) needs, as declared in `settings`."""

    command: SearchCommand
    targets: TargetSettings
    search: SearchSettings
    # The evaluators' settings: the proxy's, then the finetune evaluator's tasks and budget.
    proxy: ProxySettings
    proxy_data: ProxyDataCommand
    tasks: TaskDataSettings
    budget: FinetuneBudget
    task_eval: TaskEvaluatorSettings = dataclasses.field(default_factory=TaskEvaluatorSettings)

    def evaluator_options(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of the ``kind`` evaluator (`ProxyEvaluator` / `FinetuneEvaluator` / `TaskEvaluator`)."""
        supernet, device = self.command.supernet, self.command.device
        if kind == "proxy":
            p, data = self.proxy, self.proxy_data
            return dict(supernet=supernet, valid_corpus=data.valid_corpus or [], metric=p.metric, teacher=p.teacher,
                        trust_remote_code=p.trust_remote_code,
                        seq_len=data.seq_len, batch_size=p.eval_batch_size, batches=p.eval_batches,
                        seed=self.search.seed, cache_dir=data.cache_dir, device=device)
        t = self.tasks
        if kind == "task":
            if len(t.tasks) != 1:
                raise UserError("--evaluator task scores one task: give exactly one --task (the SuperPLM's)")
            return dict(supernet=supernet, device=device, task=t.tasks[0], data_dir=t.data_dir,
                        settings=budget_settings(self.budget))
        return dict(supernet=supernet, device=device, tasks=t.tasks, data_dir=t.data_dir, hub=t.hub,
                    train_file=t.train_file, dev_file=t.dev_file, settings=budget_settings(self.budget))


def budget_settings(budget: FinetuneBudget) -> FinetuneSettings:
    """The fine-tuning settings of one candidate of the finetune evaluator."""
    return FinetuneSettings(epochs=budget.epochs, max_steps=budget.max_steps, learning_rate=budget.lr,
                            batch_size=budget.batch_size, max_train_examples=budget.max_train_examples,
                            max_eval_examples=budget.max_eval_examples, max_seq_length=budget.max_seq_length,
                            seed=budget.seed, group_by_length=True, progress=False,
                            validation_examples=budget.validation_examples)


def _require(command: Any, *names: str) -> None:
    missing = [f"--{name}" for name in names if getattr(command, name) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")


def _check_out(out: Path, resume: bool, states: tuple[str, ...]) -> bool:
    """The resume rule of every stage (training.py): ``--resume`` continues the state files in
    ``out``, and starts the run where none was written yet (a stop before the first evaluation);
    without it a non-empty ``out`` is refused. Returns whether there is a state to continue."""
    content = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not resume:
        if content:
            raise UserError(f"--out {out} is not empty; pass --resume to continue there or choose another path")
        return False
    if any((out / name).is_file() for name in states):
        return True
    if set(content) - {"config.yaml"}:
        raise UserError(f"--resume: {out} holds no search state ({', '.join(states)}) and is not empty; choose "
                        "another --out")
    return False


def _create_out(out: Path, arguments: dict[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if arguments is not None:
        write_stage_config(out, arguments)


def run_search_stage(job: SearchJob, *, arguments: dict[str, Any] | None = None) -> dict:
    """Search the SuperPLM for each target; see the module docstring for the files written.

    ``job.command.evaluator`` is ``proxy`` (`ProxySettings`, `ProxyDataCommand`) or ``finetune``
    (`TaskDataSettings`, `FinetuneBudget`); ``workers`` > 1 evaluates each generation in that many
    processes.
    """
    from .latency import LatencyPredictor
    from .latency.predictor import brief_space

    c = job.command
    _require(c, "supernet", "predictor", "out")
    out = Path(c.out)
    resume = _check_out(out, c.resume, ("state.json",))
    # Options first, then files, then the cheap numpy candidates, then the models.
    if c.evaluator == "finetune" and not job.tasks.tasks:
        raise UserError("--evaluator finetune needs at least one --task (e.g. --task sst2)")
    if job.task_eval.rerank and c.evaluator != "task":
        raise UserError("--rerank re-scores the task evaluator's shortlist; use it with --evaluator task")
    latency = LatencyPredictor.load(c.predictor)
    targets = make_targets(job.targets.speedups, job.targets.target_ms, latency.reference_ms)
    # Candidates first (cheap, numpy): an infeasible target fails before any model is loaded.
    space = search_grid(_supernet_space(c.supernet), job.targets.grid_step_hidden, job.targets.grid_step_ffn)
    if not latency.covers(space.largest()) or not latency.covers(space.smallest()):
        warnings.warn(f"the latency predictor was fitted on another space ({brief_space(latency.space)}); parts of the "
                      "SuperPLM's space are extrapolated", SetupWarning, stacklevel=2)
    candidates = find_candidates(space, latency.predict_features, targets, job.search.window)
    check_method(candidates, job.search.method)
    with contextlib.ExitStack() as stack:  # both evaluators built first: bad options fail before any work
        fitness = stack.enter_context(open_evaluator(c.evaluator, job.evaluator_options(c.evaluator), c.workers))
        rescore = None
        if job.task_eval.rerank:
            rescore = stack.enter_context(open_evaluator("task", {**job.evaluator_options("task"), "retrain": True,
                                                                 "teacher": job.task_eval.rerank_teacher, "cache_dir": None}))
        return _search_with(fitness, space=space, targets=targets, candidates=candidates, latency=latency,
                            settings=job.search, out=out, resume=resume, progress=c.progress, plot=c.plot,
                            metric={"proxy": job.proxy.metric, "task": "task score"}.get(c.evaluator, "finetune score"),
                            arguments=arguments, rescore=rescore, shortlist=job.task_eval.rerank)


def _search_with(fitness, *, space, targets, candidates, latency, settings, out: Path, resume: bool, metric: str,
                 progress: bool, plot: bool, arguments, rescore=None, shortlist: int = 0) -> dict:
    """Run the search with a ready evaluator and write every output file."""
    state_path = out / "state.json"
    if resume:  # a state of other settings is refused before config.yaml is rewritten with them
        read_state(state_path, state_header(space, targets, settings, fitness.key))
    _create_out(out, arguments)
    budget = len(targets) * settings.generations * settings.generation_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=budget, desc=f"search ({settings.method})", unit="arch")

    def on_visit(visit: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{visit['arch']} {visit['fitness']:.4f}")

    start = time.perf_counter()
    results, evals = search(space, targets, fitness, latency.predict_features, settings, evaluator_key=fitness.key,
                            state_path=state_path, resume=resume, on_visit=on_visit,
                            candidates=candidates)
    if bar is not None:
        bar.close()
    if rescore is not None:  # the shortlist re-scored after a short retrain picks each target's best
        rerank(results, rescore, shortlist, on_visit=lambda v: print(
            f"re-ranked {v['arch']}: inherited {v['fitness']:.2f}, after retraining {v['rescored']:.2f}"))
    seconds = time.perf_counter() - start
    summary = write_outputs(out, results, evals, extra={
        "method": settings.method, "evaluator": fitness.key, "metric": metric, "grid": space.to_dict(),
        "seconds": round(seconds, 3),
        # Over every evaluation in the state (a resumed run may evaluate nothing itself).
        "seconds_per_evaluation": (round(sum(r["seconds"] for r in evals.records) / len(evals.records), 4)
                                   if evals.records else None),
    })
    if plot:
        try:
            from .report import plot_pareto

            plot_pareto(out / "results.json", out / "pareto.png",
                        ylabel=metric if metric in ("mlm_accuracy", "finetune score") else f"-{metric}")
        except UserError as err:  # no matplotlib: the results stand without the picture
            print(f"warning: {err}")
    return summary


def _evaluator_class(kind: str):
    from .evaluators import FinetuneEvaluator, ProxyEvaluator, TaskEvaluator

    return {"proxy": ProxyEvaluator, "finetune": FinetuneEvaluator, "task": TaskEvaluator}[kind]


@contextlib.contextmanager
def open_evaluator(kind: str, options: dict[str, Any], workers: int = 1) -> Iterator[Any]:
    """The ``kind`` evaluator built from ``options`` (a fitness ``Arch -> float`` with a ``key``),
    wrapped in a `WorkerPool` of ``workers`` processes when more than one."""
    from .evaluators import WorkerPool

    evaluator = _evaluator_class(kind)(**options)  # in this process first: bad options fail here, once
    if workers == 1:
        yield evaluator
        return
    with WorkerPool(evaluator, _evaluator_class(kind), options, workers) as pool:
        yield pool


def _supernet_space(supernet: Path) -> SearchSpace:
    """The SuperPLM's space from its config.json, without loading torch or the weights."""
    return SearchSpace.of_checkpoint(supernet, "--supernet")


# --- trust check: does the proxy rank architectures like fine-tuning does? ------------------------
CORRELATE_FORMAT = "autotinybert-correlate-state"


def run_correlate(job: SearchJob, samples: int, fitness: Sequence[str] = ("proxy",), *,
                  arguments: dict[str, Any] | None = None) -> dict:
    """Score ``samples`` architectures with each ``fitness`` evaluator (proxy, task) and the finetune
    evaluator, and report how each ranks them against the fine-tuned score (`correlation_summary`).

    The sample is drawn from the search grid, or from the candidates of the given latency
    targets when a predictor is given (the ranking the search needs is the one inside a window).
    Every evaluation is cached in ``out`` and resumable, like a search's.
    """
    c = job.command
    _require(c, "supernet", "out")
    out = Path(c.out)
    kinds = [*dict.fromkeys(fitness), "finetune"]
    resume = _check_out(out, c.resume, tuple(f"{kind}-state.json" for kind in kinds))
    archs = _correlate_sample(job, samples)
    scores = {}
    with contextlib.ExitStack() as stack:  # all built first: bad options of any fail before any work
        evaluators = {kind: stack.enter_context(open_evaluator(kind, job.evaluator_options(kind),
                                                               c.workers if kind == "finetune" else 1))
                      for kind in kinds}
        _create_out(out, arguments)  # every input checked: now the output may appear
        for kind, evaluator in evaluators.items():
            scores[kind] = _evaluate_sample(evaluator, archs, out / f"{kind}-state.json", resume, kind, c.progress)
    summary = correlation_summary(archs, {kind: scores[kind] for kind in kinds[:-1]}, scores["finetune"])
    atomic_write_json(out / "correlate.json", summary)
    return summary


def _correlate_sample(job: SearchJob, samples: int) -> list[tuple[str, float | None]]:
    """(architecture, predicted ms or None) pairs: distinct, drawn with the search seed."""
    import random

    t, predictor = job.targets, job.command.predictor
    space = search_grid(_supernet_space(job.command.supernet), t.grid_step_hidden, t.grid_step_ffn)
    rng = random.Random(f"autotinybert-correlate:{job.search.seed}")
    if predictor is None:
        if t.speedups or t.target_ms:
            raise UserError("--speedup / --target-ms need --predictor")
        if space.size() < samples:
            raise UserError(f"the search grid holds {space.size()} architectures, fewer than --samples {samples}")
        chosen: dict[str, None] = {}
        for _ in range(100 * samples):
            chosen.setdefault(str(space.sample(rng)))
            if len(chosen) == samples:
                break
        return [(arch, None) for arch in chosen]
    from .latency import LatencyPredictor
    from .search import arch_of

    latency = LatencyPredictor.load(predictor)
    targets = make_targets(t.speedups, t.target_ms, latency.reference_ms)
    window = job.search.window
    pool = [(str(arch_of(row)), float(ms)) for cands in find_candidates(space, latency.predict_features, targets, window)
            for row, ms in zip(cands.features, cands.latency_ms)]
    pool = list(dict(pool).items())  # one entry per architecture
    if len(pool) < samples:
        raise UserError(f"the targets' windows hold {len(pool)} architectures, fewer than --samples {samples}; "
                        "lower --samples or widen --window")
    return rng.sample(pool, samples)


def _evaluate_sample(fitness, archs, state_path: Path, resume: bool, kind: str, progress: bool) -> list[float]:
    from .search import Evaluations
    from .space import Arch

    header = {"format": CORRELATE_FORMAT, "evaluator": fitness.key, "archs": [a for a, _ in archs]}
    evals = Evaluations(fitness, fitness.key, state_path, header)
    if resume and state_path.is_file():
        import json

        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{state_path} is corrupt ({err}); remove it to evaluate again") from None
        evals.load({"evaluations": [r for r in state.get("evaluations", []) if r.get("evaluator") == fitness.key]})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(archs), desc=f"correlate: {kind}", unit="arch")
    values = []
    for fitness_value, _ in evals.get_many([(Arch.parse(a), ms) for a, ms in archs], "correlate", 0):
        values.append(fitness_value)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    evals.save()
    return values


def correlation_summary(archs: list[tuple[str, float | None]], fitness: dict[str, list[float]],
                        finetune: list[float]) -> dict:
    """How each fitness ranks the architectures against the fine-tuned score: Spearman and Kendall
    rank correlations, and the top-1 regret (the best fine-tuned score minus that of the fitness's
    pick), with every row. The first fitness's correlations are also at the top level."""
    import warnings

    from scipy import stats

    def finite(value) -> float | None:  # constant inputs give NaN: say "undefined", not NaN
        value = float(value)
        return value if value == value else None

    per = {}
    for name, values in fitness.items():
        with warnings.catch_warnings():  # a constant input is reported as "undefined"
            warnings.simplefilter("ignore")
            spearman, kendall = stats.spearmanr(values, finetune), stats.kendalltau(values, finetune)
        pick = max(range(len(values)), key=lambda i: (values[i], -i))
        per[name] = {"spearman": finite(spearman.statistic), "spearman_p": finite(spearman.pvalue),
                     "kendall": finite(kendall.statistic), "kendall_p": finite(kendall.pvalue),
                     "pick": archs[pick][0], "top1_regret": max(finetune) - finetune[pick]}
    first = per[next(iter(fitness))]
    return {
        "samples": len(archs), **{k: first[k] for k in ("spearman", "spearman_p", "kendall", "kendall_p")},
        "fitness": per,
        "rows": [{"arch": a, "latency_ms": ms, **{name: values[i] for name, values in fitness.items()},
                  "finetune": finetune[i]} for i, (a, ms) in enumerate(archs)],
    }
