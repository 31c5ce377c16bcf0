"""Does the predictor promise what a user measures? Held-out architectures timed as a user would.

1. **profile** ``--samples`` architectures of ``--space`` (resumable; BERT-base is timed as the
   reference, the drift anchor paces every chunk) and **fit** the predictor (`latency fit`): or reuse
   ``--predictor``.
2. **held out**: ``--archs`` architectures of the space that were not profiled, spread over its
   latency range (the predicted-latency quantiles of a seeded sample), saved as random-weight
   checkpoints (what `extract --encoder-only` writes: stock BERT, or our type when Q != H), and
   BERT-base beside them.
3. **timed as a user would**: ``autotinybert latency compare`` in a fresh process (a plain loop,
   each round times every model once, the reference in every round, median of per-round ratios).
4. **compared**: each model's measured speed-up over BERT-base against the predictor's
   (BERT-base's predicted latency / the model's): signed error (negative: slower than promised),
   MAPE, mean signed error, Spearman.

    PYTHONPATH=src python bench/latency_honesty.py --work bench-out/honesty --space paper-kd \\
        --samples 60 --archs 8 --rounds 15 --clock cpu --out docs/results/latency-honesty
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from autotinybert.files import atomic_write_json, atomic_write_text
from autotinybert.latency import LatencyPredictor, LatencySettings, build_model, fit, profile, read_records
from autotinybert.space import Arch, SearchSpace

BERT_BASE = Arch(12, 768, 3072, 12, 768)


def stage_predictor(args) -> LatencyPredictor:
    if args.predictor:
        return LatencyPredictor.load(args.predictor, check_fingerprint=False)
    out = args.work / "latency"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "predictor.json").is_file():
        settings = LatencySettings(threads=1, clock=args.clock, warmup=3, repeats=args.repeats)
        print(f"profile {args.samples} architectures of {args.space} ({args.clock} clock)", flush=True)
        profile(args.space, args.samples, out / "profile.jsonl", settings, resume=True, progress=args.progress,
                drift_anchor=True)
        predictor, report = fit(out / "profile.jsonl")
        predictor.save(out / "predictor.json")
        atomic_write_json(out / "fit.json", report)
    return LatencyPredictor.load(out / "predictor.json", check_fingerprint=False)


def held_out(predictor: LatencyPredictor, profiled: set[str], count: int, seed: int) -> list[Arch]:
    """``count`` unprofiled architectures at evenly spaced quantiles of predicted latency."""
    space = SearchSpace.from_dict(predictor.space)
    rng = random.Random(seed)
    pool = sorted({a for a in (space.sample(rng) for _ in range(50 * count)) if str(a) not in profiled},
                  key=lambda a: (predictor.predict(a), str(a)))
    return [pool[round(i * (len(pool) - 1) / max(1, count - 1))] for i in range(count)]


def save_checkpoints(archs: list[Arch], directory: Path) -> dict[str, Path]:
    paths = {}
    for arch in archs:
        path = directory / str(arch)
        if not (path / "config.json").is_file():
            build_model(arch).save_pretrained(str(path))
        paths[str(arch)] = path
    return paths


def time_as_a_user(args, paths: dict[str, Path], reference: Path) -> dict:
    out = args.work / "compare.json"
    argv = [sys.executable, "-m", "autotinybert", "latency", "compare", "--model", *map(str, paths.values()),
            "--reference", str(reference), "--rounds", str(args.rounds), "--clock", args.clock, "--threads", "1",
            "--out", str(out), "--overwrite"]
    subprocess.run(argv, check=True)  # a fresh process: nothing of this one (threads, caches) carries over
    return json.loads(out.read_text())


def spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--space", default="paper-kd")
    p.add_argument("--predictor", type=Path, help="reuse this fitted predictor (skip profiling)")
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--archs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    predictor = stage_predictor(args)
    profile_file = args.predictor.with_name("profile.jsonl") if args.predictor else args.work / "latency" / "profile.jsonl"
    profiled = {r["arch"] for r in read_records(profile_file)} if profile_file.is_file() else set()
    archs = held_out(predictor, profiled, args.archs, args.seed)
    paths = save_checkpoints(archs + [BERT_BASE], args.work / "models")
    reference = paths.pop(str(BERT_BASE))
    measured = time_as_a_user(args, paths, reference)
    by_path = {row["model"]: row for row in measured["models"][1:]}
    rows = []
    for arch, path in paths.items():
        row = by_path[str(path)]
        promised = predictor.reference_ms / predictor.predict(arch)
        rows.append({"arch": arch, "predicted_ms": round(predictor.predict(arch), 3), "measured_ms": row["median_ms"],
                     "promised_speedup": round(promised, 4), "measured_speedup": row["speedup"],
                     "noise": row["noise"], "error_pct": round(100 * (row["speedup"] / promised - 1), 2)})
    errors = [r["error_pct"] for r in rows]
    summary = {"predictor": str(args.predictor or args.work / "latency" / "predictor.json"), "clock": args.clock,
               "rounds": args.rounds, "reference": str(BERT_BASE),
               "reference_measured_ms": measured["models"][0]["median_ms"],
               "reference_predicted_ms": predictor.reference_ms, "rows": rows,
               "mape_pct": round(statistics.mean(abs(e) for e in errors), 2),
               "mean_signed_error_pct": round(statistics.mean(errors), 2),
               "spearman": round(spearman([r["promised_speedup"] for r in rows],
                                          [r["measured_speedup"] for r in rows]), 4),
               "load_average": {"before": load_before, "after": os.getloadavg()},
               "seconds": round(time.time() - started, 1)}
    table = markdown(summary)
    print(table)
    if args.out:
        atomic_write_json(args.out.with_suffix(".json"), summary)
        atomic_write_text(args.out.with_suffix(".md"), table)


def markdown(summary: dict) -> str:
    lines = ["| architecture | predicted ms | measured ms | promised speed-up | measured speed-up | error | noise |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['arch']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {r['promised_speedup']:.2f}x "
                     f"| {r['measured_speedup']:.2f}x | {r['error_pct']:+.1f}% | {100 * r['noise']:.0f}% |")
    lines += ["", f"Speed-ups over BERT-base ({summary['reference_measured_ms']:.1f} ms measured, "
                  f"{summary['reference_predicted_ms']:.1f} ms at profile time), {summary['clock']} clock, "
                  f"{summary['rounds']} rounds: MAPE {summary['mape_pct']:.2f}%, mean signed error "
                  f"{summary['mean_signed_error_pct']:+.2f}% (negative: slower than promised), Spearman "
                  f"{summary['spearman']:.3f}; load average {summary['load_average']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
