"""The paper's central claim at small scale: searched vs BERT-style architectures at equal latency.

AutoTinyBERT (Yin et al., ACL 2021, Tables 2-3) compares, at the same speedup, the searched
architecture with a hand-designed BERT-style one (d_f = 4·d_m, d_qkv = d_m, h = d_m / 64, the
same number of layers), both trained with the same budget; and (§5, "efficient development")
the time to develop models for several latency targets from one SuperPLM with the time to
pre-train one tiny model from scratch. This script does both on this machine, end to end:

1. latency: profile the SuperPLM's space on this CPU (1 thread, batch 1, seq 128, CPU clock)
   and fit the latency predictor;
2. per target: a BERT-style baseline defines it; the search (evolved, proxy fitness = held-out
   MLM loss of the inherited sub-model) runs over the baseline's depth inside a narrow window
   around the baseline's *predicted* latency; the fittest visited architecture whose *measured*
   latency (side by side with the baseline) is within --tolerance of the baseline's wins;
3. further training of every searched and baseline architecture from the SuperPLM's slice
   (`autotinybert pretrain --arch A --init SUPERPLM`, the same steps and settings);
4. fine-tuning each on GLUE tasks with the same budget and several seeds (`autotinybert finetune`),
   full dev sets;
5. pre-training one tiny model (the searched architecture of --scratch-target) from scratch to
   the validation MLM loss its further-trained twin reached, and the development-time ratio;
6. a JSON of every number and a markdown table.

Every piece writes into --work and is skipped when it is complete there (stages 3-5 continue
interrupted runs with --resume), so rerunning the command finishes what is missing.

    PYTHONPATH=src python bench/paper_claim.py --superplm /work/runs/mlm --work /work/runs7c/claim \\
        --corpus /work/shared/data/corpus --valid-corpus /work/shared/data/corpus/valid \\
        --glue /work/shared/data/glue --cache-dir /work/runs7c/cache \\
        --json docs/results/paper-claim.json --markdown docs/results/paper-claim.md
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from autotinybert.files import atomic_write_json
from autotinybert.space import Arch, Dim, SearchSpace

from jobs import Job, cell, finetune_run, latency_settings, publish, results_of, run_jobs, stage_predictor

TASKS = ("sst2", "mrpc", "rte", "cola")


# --- architectures -----------------------------------------------------------------------------
def bert_style(layers: int, hidden: int) -> Arch:
    """BERT's hand-made ratios: d_f = 4·d_m, d_qkv = d_m, one 64-wide head per 64 hidden units."""
    if hidden % 64:
        raise ValueError(f"a BERT-style hidden size is a multiple of 64 (heads = d_m / 64); got {hidden}")
    return Arch(layers, hidden, 4 * hidden, hidden // 64, hidden)


def parse_baseline(text: str) -> Arch:
    """'L4-H192' (or a full 'L4-H192-F768-A3-Q192' that must follow the BERT rule) -> Arch."""
    parts = {p[0]: int(p[1:]) for p in text.strip().upper().split("-")}
    arch = bert_style(parts["L"], parts["H"])
    if len(parts) > 2 and Arch.parse(text) != arch:
        raise ValueError(f"{text} is not BERT-style; the rule gives {arch}")
    return arch


def depth_space(space: SearchSpace, layers: int) -> SearchSpace:
    """The space with the depth fixed (the paper's baselines share the searched model's depth)."""
    return dataclasses.replace(space, layers=Dim(layers, layers, 1))


# --- equal measured latency ---------------------------------------------------------------------
def match_equal_latency(ranked: Sequence[Arch], baseline: Arch, measure_pair: Callable[[Arch, Arch], tuple[float, float]],
                        tolerance: float = 0.05, max_checks: int = 12) -> dict:
    """The fittest architecture of ``ranked`` whose measured latency is within ``tolerance`` of the baseline's.

    ``ranked`` is best first; ``measure_pair(a, b)`` times both side by side and returns
    (ms of a, ms of b). At most ``max_checks`` are timed; if none matches, ``matched`` is False
    and ``arch`` is the closest one timed (the caller decides what to do with it).
    """
    checked = []
    for arch in list(ranked)[:max_checks]:
        a_ms, b_ms = measure_pair(arch, baseline)
        ratio = a_ms / b_ms
        checked.append({"arch": str(arch), "ms": a_ms, "baseline_ms": b_ms, "ratio": ratio})
        if abs(ratio - 1.0) <= tolerance:
            return {"arch": str(arch), "matched": True, "ms": a_ms, "baseline_ms": b_ms, "ratio": ratio,
                    "checked": checked}
    if not checked:
        raise ValueError("no candidate to match")
    closest = min(checked, key=lambda c: abs(c["ratio"] - 1.0))
    return {**closest, "matched": False, "checked": checked}


def measure_side_by_side(archs: Sequence[Arch], rounds: int, settings) -> dict[str, float]:
    """Median over ``rounds`` of each architecture's median latency, timed in alternating order."""
    from autotinybert.latency import measure

    times: dict[str, list[float]] = {str(a): [] for a in archs}
    for r in range(rounds):
        for arch in (archs if r % 2 == 0 else list(reversed(archs))):
            times[str(arch)].append(measure(arch, settings)["latency"]["median_ms"])
    return {k: statistics.median(v) for k, v in times.items()}


# --- stage 1: latency predictor ------------------------------------------------------------------
# --- stage 2: search and matching ----------------------------------------------------------------
def stage_pairs(args, space: SearchSpace) -> list[dict]:
    out = args.work / "pairs.json"
    pairs = json.loads(out.read_text()) if out.is_file() else []
    known = {p["baseline"] for p in pairs}
    todo = [b for b in args.baselines if str(b) not in known]
    if todo:
        from autotinybert.evaluators import ProxyEvaluator
        from autotinybert.latency import LatencyPredictor

        predictor = LatencyPredictor.load(args.work / "latency" / "predictor.json", check_fingerprint=False)
        fitness = ProxyEvaluator(args.superplm, args.valid_corpus, metric="mlm_loss", batches=args.eval_batches,
                                 cache_dir=args.cache_dir)
        for baseline in todo:
            pairs.append(search_one(args, space, baseline, predictor, fitness))
            atomic_write_json(out, pairs)
    order = [str(b) for b in args.baselines]
    return sorted((p for p in pairs if p["baseline"] in order), key=lambda p: order.index(p["baseline"]))


def search_one(args, space: SearchSpace, baseline: Arch, predictor, fitness) -> dict:
    """Search at the baseline's depth, then time the fittest candidates against the baseline.

    The predictor may be biased between architecture families (here: narrow attention vs
    BERT-style), so when no timed candidate matches, the target is rescaled by the median
    measured/baseline ratio of the candidates timed so far and the search runs again
    (--calibration-rounds times at most); candidates are ranked over all rounds.
    """
    timed: dict[str, tuple[float, float]] = {}

    def pair_ms(a: Arch, b: Arch) -> tuple[float, float]:
        if str(a) not in timed:  # one side-by-side timing per candidate, reused across rounds
            timed[str(a)] = _pair(a, b, args)
        return timed[str(a)]

    visits: dict[str, dict] = {}
    rounds, scale, seconds = [], 1.0, {"search": 0.0, "match": 0.0}
    for r in range(args.calibration_rounds + 1):
        clock = time.perf_counter()
        result = _search_round(args, space, baseline, predictor, fitness, predictor.predict(baseline) * scale, r)
        visits.update({v["arch"]: v for v in result.visits})
        ranked = sorted(visits.values(), key=lambda v: (-v["fitness"], v["latency_ms"], v["arch"]))
        seconds["search"] += time.perf_counter() - clock
        clock = time.perf_counter()
        match = match_equal_latency([Arch.parse(v["arch"]) for v in ranked], baseline, pair_ms, args.tolerance,
                                    args.max_checks)
        seconds["match"] += time.perf_counter() - clock
        rounds.append({"target_predicted_ms": result.target.ms, "candidates": result.candidates,
                       "visited": len(result.visits), "matched": match["matched"], "checked": match["checked"]})
        if match["matched"]:
            break
        scale /= statistics.median(c["ratio"] for c in match["checked"])
    return {"baseline": str(baseline), "searched": match["arch"], "match": match, "rounds": rounds,
            "searched_proxy_fitness": visits[match["arch"]]["fitness"],
            "baseline_proxy_fitness": float(fitness(baseline)), "best_proxy_arch": ranked[0]["arch"],
            "search_seconds": round(seconds["search"], 1), "match_seconds": round(seconds["match"], 1)}


def _search_round(args, space: SearchSpace, baseline: Arch, predictor, fitness, target_ms: float, round_: int):
    from autotinybert.search import SearchSettings, Target, search, search_grid

    grid = search_grid(depth_space(space, baseline.num_hidden_layers), 16, 32)
    settings = SearchSettings(method="evolved", generations=args.generations, generation_size=25,
                              window=tuple(args.window), seed=args.search_seed)
    name = f"{baseline}.state.json" if round_ == 0 else f"{baseline}.round{round_}.state.json"
    state = args.work / "search" / name
    state.parent.mkdir(parents=True, exist_ok=True)
    results, _ = search(grid, [Target(target_ms)], fitness, predictor.predict_features, settings,
                        evaluator_key=fitness.key, state_path=state, resume=True)
    return results[0]


def _pair(a: Arch, b: Arch, args) -> tuple[float, float]:
    ms = measure_side_by_side([a, b], args.latency_rounds, latency_settings(args))
    return ms[str(a)], ms[str(b)]


# --- subprocess jobs (pretrain through the CLI) -----------------------------------------------------
def pretrain_job(args, name: str, out: Path, arch: Arch | None, init: Path | None, steps: int,
                 eval_every: int) -> Job:
    argv = ["pretrain", "--corpus", *args.corpus, "--valid-corpus", *args.valid_corpus, "--seq-len", "64",
            "--batch-size", "32", "--max-steps", str(steps), "--lr", str(args.pretrain_lr), "--warmup-ratio", "0.05",
            "--eval-every", str(eval_every), "--eval-batches", "8", "--save-every", "100",
            "--log-every", "10", "--cache-dir", str(args.cache_dir), "--seed", "0", "--out", str(out), "--no-progress"]
    if arch is not None:
        argv += ["--arch", str(arch)]
    argv += ["--init", str(init)] if init else ["--tokenizer", str(args.superplm)]
    return Job(name, argv, out, lambda: (out / "results.json").is_file(), lambda: (out / "checkpoint").is_dir())


def superplm_timing_job(args) -> Job:
    """The SuperPLM's own command again, only to time it under the same conditions as the rest."""
    cfg = _superplm_config(args.superplm)
    out = args.work / "superplm-timing"
    argv = ["pretrain", "--corpus", *cfg["corpus"], "--valid-corpus", *cfg["valid_corpus"], "--vocab-size",
            str(cfg["vocab_size"]), "--space", str(args.space_file), "--seq-len", str(cfg["seq_len"]),
            "--batch-size", str(cfg["batch_size"]), "--max-steps", str(cfg["max_steps"]), "--lr", str(cfg["lr"]),
            "--warmup-ratio", str(cfg["warmup_ratio"]), "--eval-every", str(cfg["eval_every"]), "--eval-batches",
            str(cfg["eval_batches"]), "--save-every", str(cfg["save_every"]), "--log-every", str(cfg["log_every"]),
            "--seed", str(cfg["seed"]), "--cache-dir", str(args.cache_dir), "--out", str(out), "--no-progress"]
    return Job("superplm-timing", argv, out, lambda: (out / "results.json").is_file(),
               lambda: (out / "checkpoint").is_dir())


def _superplm_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load((path / "config.yaml").read_text())


def finetune_job(args, arch: str, seed: int) -> Job:
    return finetune_run(args, f"finetune-{arch}-seed{seed}", args.work / "further" / arch / "exported",
                        args.work / "finetune" / arch / f"seed{seed}", seed)


# --- stage 5: development time ---------------------------------------------------------------------
def valid_curve(run: Path, arch: str) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["mlm_loss"])) for r in csv.DictReader(f)
                if r["split"] == "valid" and r["arch"] == arch]


def steps_to_reach(curve: Sequence[tuple[int, float]], loss: float) -> int | None:
    """First evaluated step whose validation loss is at or below ``loss`` (None: never)."""
    return next((step for step, value in curve if value <= loss), None)


def development_time(args, pairs: list[dict], superplm_seconds: float, predictor: dict) -> dict:
    searched = [p["searched"] for p in pairs]
    further = {a: results_of(args.work / "further" / a)["wall_seconds"] for a in searched}
    search_seconds = sum(p["search_seconds"] + p["match_seconds"] for p in pairs)
    scratch_arch = searched[args.scratch_target]
    goal = results_of(args.work / "further" / scratch_arch)["validation"][scratch_arch]["mlm_loss"]
    run = args.work / "scratch" / scratch_arch
    result = results_of(run)
    reached = steps_to_reach(valid_curve(run, scratch_arch), goal)
    # The loop runs at a steady pace, so time to step s is its share of the loop's wall time.
    scratch_seconds = result["wall_seconds"] * reached / result["steps"] if reached else None
    develop = superplm_seconds + search_seconds + sum(further.values())
    return {"superplm_seconds": superplm_seconds, "search_and_match_seconds": round(search_seconds, 1),
            "predictor_seconds": predictor.get("seconds"), "further_seconds": further,
            "develop_seconds": round(develop, 1), "develop_with_predictor_seconds": round(develop + (predictor.get("seconds") or 0), 1),
            "scratch_arch": scratch_arch, "goal_valid_loss": goal, "scratch_steps_run": result["steps"],
            "scratch_wall_seconds": result["wall_seconds"], "scratch_steps_to_goal": reached,
            "scratch_final_valid_loss": valid_curve(run, scratch_arch)[-1][1],
            "scratch_seconds_to_goal": round(scratch_seconds, 1) if scratch_seconds else None,
            "ratio_develop_over_scratch": round(develop / scratch_seconds, 3) if scratch_seconds else None,
            "ratio_lower_bound_if_not_reached": (None if scratch_seconds else
                                                 round(develop / result["wall_seconds"], 3))}


# --- summary -----------------------------------------------------------------------------------------
def finetune_scores(args, arch: str) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {t: [] for t in args.tasks}
    for seed in args.seeds:
        tasks = results_of(args.work / "finetune" / arch / f"seed{seed}")["tasks"]
        for t in args.tasks:
            scores[t].append(tasks[t]["score"])
    return scores


def summarize_pair(args, pair: dict) -> dict:
    row = dict(pair)
    for role in ("searched", "baseline"):
        arch = pair[role]
        scores = finetune_scores(args, arch)
        row[f"{role}_scores"] = scores
        row[f"{role}_mean"] = {t: statistics.mean(v) for t, v in scores.items()}
        row[f"{role}_avg"] = statistics.mean(statistics.mean(v) for v in scores.values())
        row[f"{role}_valid_loss"] = results_of(args.work / "further" / arch)["validation"][arch]["mlm_loss"]
    # Per-seed task-average difference: the spread over seeds is the noise we judge against.
    diffs = [statistics.mean(row["searched_scores"][t][i] - row["baseline_scores"][t][i] for t in args.tasks)
             for i in range(len(args.seeds))]
    row["avg_diff_per_seed"] = diffs
    row["avg_diff"] = statistics.mean(diffs)
    return row


def markdown(rows: list[dict], dev: dict | None, tasks: Sequence[str]) -> str:
    names = {"sst2": "SST-2 acc", "mrpc": "MRPC (F1+acc)/2", "rte": "RTE acc", "cola": "CoLA MCC"}
    head = "| target | model | architecture | latency (ms) | valid MLM loss | " + " | ".join(names.get(t, t) for t in tasks)
    lines = [head + " | avg | Δavg per seed |", "|" + "---|" * (7 + len(tasks))]
    for r in rows:
        for role in ("searched", "baseline"):
            m = r["match"]
            ms = f"{m['ms']:.2f} ({m['ratio']:.3f}×{'' if m['matched'] else ', NOT matched'})" \
                if role == "searched" else f"{m['baseline_ms']:.2f}"
            cells = [cell(r[f"{role}_scores"][t]) for t in tasks]
            diff = ", ".join(f"{d:+.1f}" for d in r["avg_diff_per_seed"]) if role == "searched" else ""
            lines.append(f"| {r['baseline']} | {role} | {r[role]} | {ms} | {r[f'{role}_valid_loss']:.3f} | "
                         + " | ".join(cells) + f" | {r[f'{role}_avg']:.1f} | {diff} |")
    if dev:
        lines += ["", _dev_line(dev)]
    return "\n".join(lines) + "\n"


def _dev_line(dev: dict) -> str:
    if dev.get("ratio_develop_over_scratch") is None:
        return (f"Development of {dev['targets']} targets: {dev['develop_seconds']:.0f} s; the scratch model did not reach "
                f"validation loss {dev['goal_valid_loss']:.3f} in {dev['scratch_steps_run']} steps "
                f"({dev['scratch_wall_seconds']:.0f} s; final {dev['scratch_final_valid_loss']:.3f}).")
    return (f"Development of {dev['targets']} targets: {dev['develop_seconds']:.0f} s vs {dev['scratch_seconds_to_goal']:.0f} s "
            f"for one {dev['scratch_arch']} from scratch to validation loss {dev['goal_valid_loss']:.3f} "
            f"(ratio {dev['ratio_develop_over_scratch']:.2f}).")


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--superplm", type=Path, required=True, help="MLM SuperPLM run directory (pretrain --out)")
    p.add_argument("--work", type=Path, required=True, help="where every piece is written (and found on rerun)")
    p.add_argument("--corpus", nargs="+", required=True)
    p.add_argument("--valid-corpus", nargs="+", required=True)
    p.add_argument("--glue", type=Path, required=True, help="GLUE data directory (classic layout)")
    p.add_argument("--cache-dir", type=Path, required=True, help="tokenised-corpus cache")
    p.add_argument("--baselines", nargs="+", default=["L4-H128", "L3-H192", "L4-H192"],
                   help="BERT-style baselines, one per latency target (L<layers>-H<hidden>)")
    p.add_argument("--tolerance", type=float, default=0.05, help="equal measured latency: |ratio - 1| <= this")
    p.add_argument("--window", type=float, nargs=2, default=[0.95, 1.05], help="search window around the target")
    p.add_argument("--generations", type=int, default=4, help="evolved search generations of 25")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=4, help="proxy fitness: held-out batches of 32")
    p.add_argument("--max-checks", type=int, default=15, help="candidates timed at most per target and round")
    p.add_argument("--calibration-rounds", type=int, default=2, help="re-searches with the target rescaled by "
                   "the measured ratios when no candidate matches")
    p.add_argument("--latency-samples", type=int, default=60)
    p.add_argument("--latency-seq-len", type=int, default=128)
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--latency-rounds", type=int, default=5, help="alternating rounds of side-by-side timing")
    p.add_argument("--clock", default="cpu", help="cpu (process time; robust on a shared machine) or wall")
    p.add_argument("--further-steps", type=int, default=300)
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="further training and scratch pre-training")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-train-examples", type=int, default=3000)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak learning rate")
    p.add_argument("--scratch-target", type=int, default=1, help="index of the target whose searched arch "
                   "is pre-trained from scratch (-1: skip part 2)")
    p.add_argument("--scratch-steps", type=int, default=1000)
    p.add_argument("--no-superplm-timing", action="store_true", help="use the SuperPLM's recorded wall time "
                   "instead of re-running its command under the same conditions")
    p.add_argument("--parallel", type=int, default=2, help="training processes at once (1 thread each)")
    p.add_argument("--json", type=Path, help="also write the summary JSON here")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    args.baselines = [parse_baseline(b) for b in args.baselines]
    return args


def load_space(args) -> SearchSpace:
    from autotinybert.checkpoint import load_supernet

    space = load_supernet(args.superplm).config.search_space
    args.space_file = args.work / "space.json"
    atomic_write_json(args.space_file, space.to_dict())
    args.vocab_size = json.loads((args.superplm / "config.json").read_text())["vocab_size"]
    for b in args.baselines:
        space.check(b)
    return space


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    space = load_space(args)
    predictor = stage_predictor(args, space)
    print(f"[latency] predictor: {json.dumps(predictor['fit'].get('mlp', predictor['fit']))[:200]}", flush=True)
    pairs = stage_pairs(args, space)
    for p in pairs:
        print(f"[pair] {p['baseline']} vs {p['searched']}: ratio {p['match']['ratio']:.3f} matched={p['match']['matched']}",
              flush=True)
    archs = list(dict.fromkeys(a for p in pairs for a in (p["searched"], p["baseline"])))
    logs = args.work / "logs"
    jobs = [pretrain_job(args, f"further-{a}", args.work / "further" / a, Arch.parse(a), args.superplm,
                         args.further_steps, args.further_steps) for a in archs]
    if args.scratch_target >= 0:
        scratch = pairs[args.scratch_target]["searched"]
        jobs.append(pretrain_job(args, f"scratch-{scratch}", args.work / "scratch" / scratch, Arch.parse(scratch),
                                 None, args.scratch_steps, 25))
        if not args.no_superplm_timing:
            jobs.append(superplm_timing_job(args))
    # Seed by seed, so a run cut short still has every architecture fine-tuned with the first seeds.
    finetunes = [finetune_job(args, a, s) for s in args.seeds for a in archs]
    run_jobs(jobs + finetunes, args.parallel, logs)
    write_summary(args, stage_pairs(args, space), predictor)  # re-read: notes added to pairs.json count


def write_summary(args, pairs: list[dict], predictor: dict) -> None:
    rows = [summarize_pair(args, p) for p in pairs]
    dev = None
    if args.scratch_target >= 0:
        timing = args.work / "superplm-timing" / "results.json"
        recorded = results_of(args.superplm)["wall_seconds"]
        superplm_seconds = recorded if args.no_superplm_timing else json.loads(timing.read_text())["wall_seconds"]
        dev = {"targets": len(pairs), "superplm_recorded_seconds": recorded,
               **development_time(args, pairs, superplm_seconds, predictor)}
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("baselines",)} | {"baselines": [str(b) for b in args.baselines]},
               "predictor": predictor, "pairs": rows, "development": dev}
    publish(args, summary, markdown(rows, dev, args.tasks))


if __name__ == "__main__":
    main()
