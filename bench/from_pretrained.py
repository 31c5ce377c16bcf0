"""What the pre-trained start buys: searched models from an importance-ordered SuperPLM of
all-MiniLM-L6-v2 (or any BERT-family SOURCE) against the ablations and the source itself.

At three latency targets, 2x, 3x and 5x faster than the source as measured on this CPU (1 thread,
batch 1, sequence 128, process CPU clock), with the same one-shot training budget for every
SuperPLM and the same fine-tuning budget for every model:

  (a) ordered  - the searched architecture of the SuperPLM started from the activation-ordered source;
  (b) first-k  - the same architecture from the SuperPLM started from the source in its own order
                 (``--importance none``): the two differ only in the ordering;
  (c) random   - the searched architecture of the SuperPLM started from random weights (same space,
                 tokenizer, teacher and steps);
  (d) bert     - a BERT-ratio architecture (F = 4H, Q = H, the searched depth, the widest H under the
                 target) from the ordered SuperPLM.

The source, fine-tuned with the same budget, is the reference. Then ``search correlate`` on the
ordered SuperPLM: proxy (KD loss) vs fine-tuned fitness of architectures in the 3x window.

With ``--task-kd`` every model is also fine-tuned with that fine-tuned source as its teacher
(logits distillation: what a user who owns the source would do next). ``--finetune-dir NAME
--models 3x-ordered 3x-bert`` fine-tunes the named models again with another budget beside the
first (the other stages are reused).

Stages, each skipped when complete in --work (rerun the command to finish what is missing):
start (init --from, twice) -> superplm (pretrain, three runs) -> latency (profile + fit; the source
and every model timed side by side) -> search (ordered, random) -> models (extract) -> finetune
(every model and the source, every seed) -> correlate -> summary JSON + markdown.

    PYTHONPATH=src python bench/from_pretrained.py --work /work/fp --corpus ../shared/data/corpus \\
        --glue ../shared/data/glue_data --cache-dir /work/fp/cache \\
        --json docs/results/results-pretrained.json --markdown docs/results/results-pretrained.table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

from autotinybert.files import atomic_write_json
from autotinybert.space import Arch, SearchSpace, parameter_count

from jobs import (Job, cell, finetune_run, finished, latency_settings, publish, results_of, run_jobs,
                  stage_predictor)

TASKS = ("sst2", "mrpc", "stsb", "rte", "cola")
LABELS = {"ordered": "(a) searched, ordered start", "firstk": "(b) same arch, first-k start",
          "random": "(c) searched, random start", "bert": "(d) BERT-ratio, ordered start",
          "inplace": "(e) same arch, ordered + in-place distillation", "mapped": "(f) same arch, ordered + layer-mapped KD"}
# SuperPLM -> (its start, what its one-shot training adds to the common settings)
SUPERPLMS = {"ordered": ("ordered", []), "firstk": ("firstk", []), "random": ("ordered", None),
             "inplace": ("ordered", ["--distill-from", "largest"]), "mapped": ("ordered", ["--kd-layers", "mapped"])}
TRAINING_ABLATIONS = ("inplace", "mapped")  # the searched arch (a) again, from a SuperPLM trained another way
TASK_KD = "+kd"  # suffix of a model fine-tuned with the fine-tuned source as its teacher (--task-kd)


def _exists(path: Path):
    return lambda: path.is_file()


# --- stage 1-2: starts and SuperPLMs ------------------------------------------------------------
def start_jobs(args) -> list[Job]:
    jobs = []
    for name, importance in (("ordered", "activation"), ("firstk", "none")):
        out = args.work / "start" / name
        argv = ["init", "--from", args.source, "--mode", "kd", "--importance", importance,
                "--calibration-corpus", *args.corpus, "--out", str(out)]
        jobs.append(Job(f"start-{name}", argv, out, _exists(out / "config.json"), lambda: False))
    return jobs


def superplm_jobs(args) -> list[Job]:
    """One-shot KD training, sandwich sampling, the source as teacher; identical settings for all three.
    The random one shares the ordered start's space and tokenizer but not its weights."""
    jobs = []
    for name, (start_name, extra) in SUPERPLMS.items():
        start = args.work / "start" / start_name
        out = args.work / "superplm" / name
        argv = ["pretrain", "--corpus", *args.corpus, "--space", str(start), "--tokenizer", str(start),
                "--teacher", args.source, "--objective", "kd", "--sampling", "sandwich",
                "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                "--max-steps", str(args.steps), "--lr", str(args.pretrain_lr), "--warmup-ratio", "0.1",
                "--eval-every", str(args.steps), "--eval-batches", "4", "--save-every", "25", "--log-every", "10",
                "--cache-dir", str(args.cache_dir), "--seed", "0", "--out", str(out), "--no-progress"]
        argv += ["--init", str(start), *extra] if extra is not None else []  # random: the start's space only
        if args.valid_corpus:
            argv += ["--valid-corpus", *args.valid_corpus]
        jobs.append(Job(f"superplm-{name}", argv, out, _exists(out / "results.json"),
                        lambda out=out: (out / "checkpoint").is_dir(), _exists(start / "config.json")))
    return jobs


# --- stage 3-4: targets and search -------------------------------------------------------------
def source_latency(args, space: SearchSpace) -> dict:
    """The source's latency (the space's largest architecture, the source's exact shape)."""
    from autotinybert.latency import measure_many

    path = args.work / "latency" / "source.json"
    if not path.is_file():
        record = measure_many([space.largest()], latency_settings(args))[0]
        atomic_write_json(path, {"arch": str(space.largest()), "ms": record["latency"]["median_ms"]})
    return json.loads(path.read_text())


def search_jobs(args, targets_ms: Sequence[float]) -> list[Job]:
    jobs = []
    for name in ("ordered", "random"):
        superplm, out = args.work / "superplm" / name, args.work / "search" / name
        argv = ["search", "--supernet", str(superplm), "--predictor", str(args.work / "latency" / "predictor.json"),
                "--out", str(out), *[x for ms in targets_ms for x in ("--target-ms", f"{ms:.4f}")],
                "--method", "evolved", "--generations", str(args.generations), "--generation-size", str(args.generation_size),
                "--metric", "kd_loss", "--teacher", args.source, "--eval-batches", "3",
                "--cache-dir", str(args.cache_dir), "--seed", "0", "--no-plot", "--no-progress"]
        if args.valid_corpus:
            argv += ["--valid-corpus", *args.valid_corpus]
        jobs.append(Job(f"search-{name}", argv, out, _exists(out / "best.json"),
                        lambda out=out: (out / "state.json").is_file(), _exists(superplm / "results.json")))
    return jobs


def bert_ratio(space: SearchSpace, layers: int, target_ms: float, predict) -> Arch:
    """F = 4H, Q = H with the source's heads: the widest H predicted under the target at the searched
    depth, or at the deepest depth below it where one fits (a narrow deep search result can be
    faster than every BERT-ratio model of its depth)."""
    heads = space.heads.max  # Q = H must split into the source's heads
    widths = range(space.hidden.max - space.hidden.max % heads, space.hidden.min - 1, -heads)
    for depth in range(layers, 0, -1):
        fitting = [a for a in (Arch(depth, h, 4 * h, heads, h) for h in widths)
                   if space.contains(a) and predict(a) <= target_ms]
        if fitting:
            return fitting[0]
    raise SystemExit(f"no BERT-ratio architecture fits {target_ms:.2f} ms")


def choose_models(args, space: SearchSpace, targets: dict[str, float]) -> dict[str, dict[str, str]]:
    """{target: {variant: arch}} from the searches' best.json files."""
    from autotinybert.latency import LatencyPredictor

    predictor = LatencyPredictor.load(args.work / "latency" / "predictor.json", check_fingerprint=False)
    best = {name: json.loads((args.work / "search" / name / "best.json").read_text()) for name in ("ordered", "random")}
    chosen = {}
    for index, (target, ms) in enumerate(targets.items()):
        searched = Arch.parse(best["ordered"][index]["arch"])
        chosen[target] = {"ordered": str(searched), "firstk": str(searched),
                          "random": best["random"][index]["arch"],
                          "bert": str(bert_ratio(space, searched.num_hidden_layers, ms, predictor.predict)),
                          **({name: str(searched) for name in TRAINING_ABLATIONS} if target in args.ablation_targets
                             else {})}
    return chosen


def model_dir(args, target: str, variant: str) -> Path:
    return args.work / "models" / f"{target}-{variant}"


def extract_jobs(args, chosen: dict[str, dict[str, str]]) -> list[Job]:
    jobs = []
    for target, variants in chosen.items():
        for variant, arch in variants.items():
            superplm = args.work / "superplm" / ("ordered" if variant == "bert" else variant)
            out = model_dir(args, target, variant)
            argv = ["extract", "--supernet", str(superplm), "--arch", arch, "--out", str(out)]
            jobs.append(Job(f"extract-{target}-{variant}", argv, out, _exists(out / "config.json"), lambda: False))
    return jobs


def measured_latency(args, source_arch: str, chosen: dict[str, dict[str, str]]) -> dict[str, float]:
    """Every model and the source timed together in interleaved rounds (one run, side by side)."""
    from autotinybert.latency import measure_many

    path = args.work / "latency" / "models.json"
    if not path.is_file():
        archs = list(dict.fromkeys([source_arch, *(a for v in chosen.values() for a in v.values())]))
        records = measure_many(archs, latency_settings(args))
        atomic_write_json(path, {r["arch"]: r["latency"]["median_ms"] for r in records})
    return json.loads(path.read_text())


# --- stage 6-7: fine-tuning and correlation ------------------------------------------------------
def finetune_jobs(args, chosen: dict[str, dict[str, str]], source: Path) -> list[Job]:
    """Seed by seed, so a run cut short has every model fine-tuned with the first seeds; the training
    ablations (e), (f) with the first seed only (they compare SuperPLM training, not seeds). With
    --task-kd every model also learns from the source fine-tuned with the same seed (its logits)."""
    jobs = []
    for seed in args.seeds:
        teacher = finetune_dir(args, "source", seed)
        jobs.append(finetune_run(args, f"{args.finetune_dir}-source-seed{seed}", source, teacher, seed))
        for target, variants in chosen.items():
            for variant in variants:
                if variant in TRAINING_ABLATIONS and seed != args.seeds[0]:
                    continue
                runs = [(variant, None)] + ([(variant + TASK_KD, teacher)] if args.task_kd else [])
                jobs += [finetune_run(args, f"{args.finetune_dir}-{target}-{name}-seed{seed}",
                                      model_dir(args, target, variant), finetune_dir(args, f"{target}-{name}", seed),
                                      seed, teacher=kd_teacher) for name, kd_teacher in runs]
    return jobs


def finetune_dir(args, run: str, seed: int) -> Path:
    return args.work / args.finetune_dir / run / f"seed{seed}"


def correlate_job(args, target_ms: float) -> Job:
    out = args.work / "correlate"
    argv = ["search", "correlate", "--supernet", str(args.work / "superplm" / "ordered"),
            "--predictor", str(args.work / "latency" / "predictor.json"), "--target-ms", f"{target_ms:.4f}",
            "--samples", str(args.correlate_samples), "--metric", "kd_loss", "--teacher", args.source,
            "--eval-batches", "3", "--cache-dir", str(args.cache_dir), "--task", args.correlate_task,
            "--data-dir", str(args.glue), "--ft-epochs", str(args.epochs), "--ft-lr", str(args.lr),
            "--ft-max-train-examples", str(args.max_train_examples), "--ft-max-seq-length", "128",
            "--out", str(out), "--seed", "0", "--no-progress"]
    if args.valid_corpus:
        argv += ["--valid-corpus", *args.valid_corpus]
    return Job("correlate", argv, out, _exists(out / "correlate.json"),
               lambda: (out / "proxy-state.json").is_file(), _exists(args.work / "superplm" / "ordered" / "results.json"))


def selected_models(args, chosen: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``chosen`` (target -> variant -> arch) restricted to ``--models`` (every model without it)."""
    if args.models is None:
        return chosen
    known = {f"{t}-{v}" for t, variants in chosen.items() for v in variants}
    unknown = sorted(set(args.models) - known)
    if unknown:
        raise SystemExit(f"--models: no model {', '.join(unknown)} in this run; choose among {', '.join(sorted(known))}")
    return {t: {v: a for v, a in variants.items() if f"{t}-{v}" in args.models} for t, variants in chosen.items()
            if any(f"{t}-{v}" in args.models for v in variants)}


# --- summary -----------------------------------------------------------------------------------
def scores_of(args, run: str) -> dict[str, list[float]]:
    runs = [finetune_dir(args, run, s) for s in args.seeds]
    done = [results_of(r)["tasks"] for r in runs if finished(r, args.tasks)]  # a run still going is left out
    return {t: [tasks[t]["score"] for tasks in done] for t in args.tasks}


def average(scores: dict[str, list[float]]) -> float:
    return statistics.mean(statistics.mean(v) for v in scores.values())


def summarize(args, source: dict, targets: dict[str, float], chosen, latency: dict[str, float], vocab: int) -> dict:
    reference = scores_of(args, "source")
    ref_avg = average(reference)
    rows = [{"target": "source", "variant": "source", "arch": source["arch"], "ms": latency[source["arch"]],
             "speedup": 1.0, "params": parameter_count(Arch.parse(source["arch"]), vocab), "scores": reference,
             "avg": ref_avg, "share_of_source": 1.0}]
    for target, variants in chosen.items():
        for variant, arch in with_task_kd(args, variants):
            scores = scores_of(args, f"{target}-{variant}")
            if not scores[args.tasks[0]]:  # --summary-only before any seed of this model finished
                continue
            rows.append({"target": target, "target_ms": targets[target], "variant": variant, "arch": arch,
                         "ms": latency[arch], "speedup": latency[source["arch"]] / latency[arch],
                         "params": parameter_count(Arch.parse(arch), vocab), "scores": scores,
                         "avg": average(scores), "share_of_source": average(scores) / ref_avg})
    return {"rows": rows, "correlate": json.loads((args.work / "correlate" / "correlate.json").read_text()),
            "superplm": {n: _superplm_summary(args.work / "superplm" / n) for n in SUPERPLMS}}


def with_task_kd(args, variants: dict[str, str]) -> list[tuple[str, str]]:
    """(variant, arch) of every fine-tuned row: each model, then (--task-kd) it again with task KD."""
    return [(name, arch) for variant, arch in variants.items()
            for name in (variant, *([variant + TASK_KD] if args.task_kd else []))]


def label(variant: str) -> str:
    if variant.endswith(TASK_KD):
        return LABELS[variant.removesuffix(TASK_KD)] + " + task KD from the fine-tuned source"
    return LABELS[variant]


def _superplm_summary(run: Path) -> dict:
    result = results_of(run)
    return {"wall_seconds": result.get("wall_seconds"), "validation": result.get("validation")}


def markdown(summary: dict, tasks: Sequence[str]) -> str:
    names = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "cola": "CoLA"}
    lines = ["| target | model | architecture | ms (speedup) | params (M) | seeds | "
             + " | ".join(names.get(t, t) for t in tasks) + " | avg | % of source |",
             "|" + "---|" * (8 + len(tasks))]
    for r in summary["rows"]:
        name = "source (reference)" if r["variant"] == "source" else label(r["variant"])
        lines.append(f"| {r['target']} | {name} | {r['arch']} | {r['ms']:.2f} ({r['speedup']:.2f}×) | "
                     f"{r['params'] / 1e6:.1f} | {len(r['scores'][tasks[0]])} | "
                     + " | ".join(cell(r["scores"][t]) for t in tasks)
                     + f" | {r['avg']:.1f} | {100 * r['share_of_source']:.1f} % |")
    c = summary["correlate"]
    def number(key: str) -> str:  # undefined (None) when one evaluator gave every architecture the same score
        return "undefined" if c.get(key) is None else f"{c[key]:.3f}"

    lines += ["", f"search correlate on the ordered SuperPLM: {c['samples']} architectures, Spearman "
              f"{number('spearman')} (p {number('spearman_p')}), Kendall {number('kendall')}."]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="where every piece is written (and found on rerun)")
    p.add_argument("--source", default="builtin:all-minilm-l6-v2", help="pre-trained BERT-family checkpoint")
    p.add_argument("--corpus", nargs="+", required=True, help="pre-training / calibration text")
    p.add_argument("--valid-corpus", nargs="*", default=[], help="held-out text for the proxy (default: the corpus')")
    p.add_argument("--glue", type=Path, required=True, help="GLUE data directory (classic layout)")
    p.add_argument("--cache-dir", type=Path, required=True, help="tokenised-corpus cache")
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 5.0], help="targets: times faster than the source")
    p.add_argument("--steps", type=int, default=80, help="one-shot training steps of every SuperPLM")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--generations", type=int, default=2, help="evolved search generations per target")
    p.add_argument("--generation-size", type=int, default=25, help="architectures per generation (the paper's 25)")
    p.add_argument("--latency-samples", type=int, default=60)
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-train-examples", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate")
    p.add_argument("--finetune-dir", default="finetune", help="folder under --work of the fine-tuning runs: another "
                   "name fine-tunes the same models again with another budget, beside the first")
    p.add_argument("--models", nargs="*", metavar="TARGET-VARIANT", help="fine-tune and summarise only these models "
                   "(e.g. 3x-ordered 3x-bert; the source always); default: every one")
    p.add_argument("--task-kd", action="store_true", help="also fine-tune every model with the source, fine-tuned "
                   "with the same seed, as its teacher (logits distillation, finetune --teacher)")
    p.add_argument("--ablation-targets", nargs="*", default=["3x"], help="targets where (e) in-place distillation "
                   "and (f) layer-mapped KD are compared (their SuperPLMs are trained regardless)")
    p.add_argument("--correlate-samples", type=int, default=12)
    p.add_argument("--correlate-task", default="sst2")
    p.add_argument("--parallel", type=int, default=2, help="processes at once (1 thread each)")
    p.add_argument("--summary-only", action="store_true", help="summarise the fine-tuning runs finished so far "
                   "(seeds not finished for a model are left out of its cells) without starting the rest")
    p.add_argument("--json", type=Path, help="also write the summary JSON here")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    args.latency_seq_len, args.clock = 128, "cpu"  # the measurement: 1 thread, batch 1, sequence 128
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from autotinybert.builtin_data import resolve_model

    torch.set_num_threads(1)
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    logs, started = args.work / "logs", time.perf_counter()
    run_jobs(start_jobs(args), args.parallel, logs)
    space = SearchSpace.of_checkpoint(args.work / "start" / "ordered", "--work")
    args.vocab_size = json.loads((args.work / "start" / "ordered" / "config.json").read_text())["vocab_size"]
    stage_predictor(args, space)  # before training starts: the profile has the cores to itself
    source = source_latency(args, space)
    targets = {f"{s:g}x": source["ms"] / s for s in args.speedups}
    print(f"[latency] source {source['arch']} {source['ms']:.2f} ms; targets "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in targets.items()), flush=True)
    run_jobs(superplm_jobs(args), args.parallel, logs)
    run_jobs(search_jobs(args, list(targets.values())), args.parallel, logs)
    chosen = choose_models(args, space, targets)
    atomic_write_json(args.work / "models.json", chosen)
    run_jobs(extract_jobs(args, chosen), args.parallel, logs)
    latency = measured_latency(args, source["arch"], chosen)  # quiet: nothing else runs now
    chosen = selected_models(args, chosen)
    third = targets.get("3x", list(targets.values())[len(targets) // 2])
    if not args.summary_only:  # the fine-tuning is the long part: a summary may be taken before it ends
        run_jobs([correlate_job(args, third), *finetune_jobs(args, chosen, Path(resolve_model(args.source)))],
                 args.parallel, logs)
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "source": source, "targets_ms": targets, "models": chosen,
               **summarize(args, source, targets, chosen, latency, args.vocab_size),
               "wall_seconds_this_invocation": round(time.perf_counter() - started, 1)}
    summary["settings"]["corpus"] = [str(c) for c in args.corpus]
    publish(args, summary, markdown(summary, args.tasks))


if __name__ == "__main__":
    main()
