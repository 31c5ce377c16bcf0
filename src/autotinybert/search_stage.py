"""The `search` stage: wires the SuperPLM evaluator and the latency predictor to the pure search.

Writes into ``--out``: ``config.yaml`` (arguments), ``state.json`` (every evaluation, rewritten
after each), ``results.json``, ``best.json`` and ``pareto.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import write_stage_config
from .search import (
    SearchSettings,
    find_candidates,
    make_targets,
    search,
    search_grid,
    write_outputs,
)
from .space import SearchSpace


def run_search_stage(*, supernet: Path, predictor: Path, speedups: list[float], target_ms: list[float],
                     settings: SearchSettings, evaluator: str, valid_corpus: list[str] | None, out: Path,
                     resume: bool = False, grid_step_hidden: int | None = 16, grid_step_ffn: int | None = 32,
                     metric: str = "mlm_accuracy", teacher: str | None = None, seq_len: int | None = None,
                     eval_batch_size: int = 32, eval_batches: int = 8, cache_dir: str | None = None,
                     device: str = "cpu", progress: bool = True, plot: bool = True,
                     arguments: dict[str, Any] | None = None) -> dict:
    from .latency import LatencyPredictor

    out = Path(out)
    state_path = out / "state.json"
    if not resume and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; pass --resume to continue the search there or choose another path")
    if resume and not state_path.is_file():
        raise UserError(f"--resume: {state_path} does not exist; run without --resume first")
    # Options first, then files, then the cheap numpy candidates, then the models.
    if evaluator == "finetune":
        from .evaluators import finetune_evaluator

        finetune_evaluator()
    if evaluator != "proxy":
        raise UserError(f"unknown evaluator {evaluator!r}: use proxy (or finetune once fine-tuning is built)")
    latency = LatencyPredictor.load(predictor)
    targets = make_targets(speedups, target_ms, latency.reference_ms)
    # Candidates first (cheap, numpy): an infeasible target fails before any model is loaded.
    space = search_grid(_supernet_space(supernet), grid_step_hidden, grid_step_ffn)
    if not latency.covers(space.largest()) or not latency.covers(space.smallest()):
        print(f"warning: the latency predictor was fitted on space {latency.space}; parts of the SuperPLM's "
              "space are extrapolated")
    candidates = find_candidates(space, latency.predict_features, targets, settings.window)
    from .evaluators import ProxyEvaluator

    fitness = ProxyEvaluator(supernet, valid_corpus or [], metric=metric, teacher=teacher, seq_len=seq_len,
                             batch_size=eval_batch_size, batches=eval_batches, seed=settings.seed,
                             cache_dir=cache_dir, device=device)
    out.mkdir(parents=True, exist_ok=True)
    if arguments is not None:
        write_stage_config(out, arguments)
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
                        ylabel=metric if metric == "mlm_accuracy" else f"-{metric}")
        except UserError as err:  # no matplotlib: the results stand without the picture
            print(f"warning: {err}")
    return summary


def _supernet_space(supernet: Path) -> SearchSpace:
    """The SuperPLM's space from its config.json, without loading torch or the weights."""
    import json

    config = Path(supernet) / "config.json"
    try:
        return SearchSpace.from_dict(json.loads(config.read_text(encoding="utf-8"))["space"])
    except FileNotFoundError:
        raise UserError(f"--supernet {supernet} is not a SuperPLM checkpoint directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{config} is not a SuperPLM config ({type(err).__name__}: {err})") from None
