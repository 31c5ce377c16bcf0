"""Search methods side by side on a real SuperPLM with the proxy evaluator.

For each target: the exhaustive best of the window (every candidate evaluated once), then
random / fast / evolved at equal budgets over several seeds, answered from the same fitness
cache (so the comparison costs nothing beyond the exhaustive pass). Also evaluations/second.

With ``--correlate-task``, the trust check too: `autotinybert search correlate` on a sample of
the targets' candidates — proxy fitness vs fine-tuned dev score, Spearman — resumable in
``<out>.correlate/``.

    PYTHONPATH=src python bench/search.py --supernet /work/runs/mlm --predictor pred.json \
        --valid-corpus /work/shared/data/corpus/valid --cache-dir /work/runs/cache \
        --target-ms 20 40 80 --out docs/results/search-bench.json \
        --correlate-task sst2 --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from autotinybert.evaluators import ProxyEvaluator
from autotinybert.latency import LatencyPredictor
from autotinybert.search import (
    METHODS,
    SearchSettings,
    Target,
    find_candidates,
    search,
    search_grid,
)
from autotinybert.space import Arch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--supernet", required=True)
    p.add_argument("--predictor", required=True)
    p.add_argument("--valid-corpus", nargs="+", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--target-ms", type=float, nargs="+", required=True)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--generation-size", type=int, default=25)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--metric", default="mlm_loss", help="proxy fitness (default mlm_loss: continuous, so few ties)")
    p.add_argument("--out", required=True)
    p.add_argument("--correlate-task", action="append", default=[], help="also: proxy vs fine-tuned Spearman on this task")
    p.add_argument("--data-dir", help="glue_data/ for --correlate-task")
    p.add_argument("--correlate-samples", type=int, default=12)
    p.add_argument("--ft-epochs", type=float, default=3.0)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-max-train-examples", type=int, default=4000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    predictor = LatencyPredictor.load(args.predictor, check_fingerprint=False)
    fitness = ProxyEvaluator(args.supernet, args.valid_corpus, metric=args.metric, batches=args.eval_batches,
                             cache_dir=args.cache_dir)
    space = search_grid(fitness.space)
    targets = [Target(ms) for ms in args.target_ms]
    # Fitness values persist next to --out, so a rerun of the bench does not re-evaluate.
    cache_file = Path(args.out).with_suffix(".fitness.json")
    cache: dict[str, float] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    loaded = len(cache)

    def cached(arch: Arch) -> float:
        key = str(arch)
        if key not in cache:
            cache[key] = fitness(arch)
            if len(cache) % 100 == 0:
                cache_file.write_text(json.dumps(cache))
                print(f"{len(cache)} evaluations, {time.perf_counter() - start:.0f} s", flush=True)
        return cache[key]

    start = time.perf_counter()
    rows = []
    for cands in find_candidates(space, predictor.predict_features, targets):
        scores = {str(Arch(*map(int, r))): cached(Arch(*map(int, r))) for r in cands.features}
        ranked = np.array(sorted(scores.values(), reverse=True))
        row = {"target_ms": cands.target.ms, "candidates": len(cands), "exhaustive_best": float(ranked[0]),
               "exhaustive_arch": max(scores, key=scores.get), "exhaustive_median": float(np.median(ranked))}
        budget = args.generations * args.generation_size
        for method in METHODS:
            bests = []
            for seed in range(args.seeds):
                settings = SearchSettings(method=method, generations=args.generations,
                                          generation_size=args.generation_size, seed=seed)
                result = search(space, [cands.target], cached, predictor.predict_features, settings,
                                candidates=[cands])[0][0]
                bests.append(result.best["fitness"])
            row[method] = {"budget": budget, "mean_best": statistics.mean(bests), "min_best": min(bests),
                           "found_exhaustive_best": int(sum(b == ranked[0] for b in bests)),
                           "mean_rank_fraction": statistics.mean(float(np.sum(ranked > b)) / len(ranked)
                                                                 for b in bests)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - start
    cache_file.write_text(json.dumps(cache))
    summary = {"targets": rows, "evaluations": len(cache), "evaluated_now": len(cache) - loaded,
               "seconds": round(seconds, 1),
               "seconds_per_evaluation": (round(statistics.mean(fitness.seconds), 4) if fitness.seconds else None), "seeds": args.seeds,
               "eval_batches": args.eval_batches, "evaluator": fitness.key}
    if args.correlate_task:
        summary["correlate"] = correlate(args)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "targets"}))


def correlate(args: argparse.Namespace) -> dict:
    """Proxy vs fine-tuned fitness on a sample of every target's candidates (Spearman, Kendall)."""
    from autotinybert import settings as S
    from autotinybert.search_stage import SearchJob, run_correlate

    out = Path(args.out).with_suffix(".correlate")
    job = SearchJob(
        command=S.SearchCommand(supernet=Path(args.supernet), predictor=Path(args.predictor), out=out,
                                evaluator="finetune", workers=args.workers, resume=out.is_dir()),
        targets=S.TargetSettings(target_ms=list(args.target_ms)), search=S.SearchSettings(seed=0),
        proxy=S.ProxySettings(metric=args.metric, eval_batches=args.eval_batches),
        proxy_data=S.ProxyDataCommand(valid_corpus=args.valid_corpus, cache_dir=args.cache_dir),
        tasks=S.TaskDataSettings(tasks=args.correlate_task, data_dir=args.data_dir),
        budget=S.FinetuneBudget(epochs=args.ft_epochs, lr=args.ft_lr, max_train_examples=args.ft_max_train_examples))
    start = time.perf_counter()
    result = run_correlate(job, args.correlate_samples)
    finetune_seconds = [r["seconds"] for r in json.loads((out / "finetune-state.json").read_text())["evaluations"]]
    return {**result, "tasks": args.correlate_task, "finetune_settings": {
        "epochs": args.ft_epochs, "lr": args.ft_lr, "max_train_examples": args.ft_max_train_examples},
        "seconds": round(time.perf_counter() - start, 1),
        "finetune_seconds_per_evaluation": round(statistics.mean(finetune_seconds), 1)}


if __name__ == "__main__":
    main()
