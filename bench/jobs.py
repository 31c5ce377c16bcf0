"""What the benches share: CLI jobs run in parallel and resumed, fine-tuning with a bench's budget,
the latency stage, and publishing a summary. Imported by the bench scripts as ``jobs`` (their own
folder is on ``sys.path`` when run as ``python bench/NAME.py``)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from autotinybert.files import atomic_write_json, atomic_write_text
from autotinybert.space import SearchSpace


# --- the latency stage -------------------------------------------------------------------------
def latency_settings(args):
    from autotinybert.latency import LatencySettings

    return LatencySettings(seq_len=args.latency_seq_len, threads=1, clock=args.clock, warmup=2,
                           repeats=args.latency_repeats, vocab_size=args.vocab_size)


def stage_predictor(args, space: SearchSpace) -> dict:
    from autotinybert import latency

    out = args.work / "latency"
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    profile_path = out / "profile.jsonl"
    latency.profile(space, args.latency_samples, profile_path, latency_settings(args), resume=True, progress=False)
    predictor, report = latency.fit(profile_path)
    predictor.save(out / "predictor.json")
    summary = {"seconds": round(time.perf_counter() - start, 1), "samples": args.latency_samples,
               "fit": {k: report[k] for k in ("n_train", "n_heldout", "mlp", "baseline")}, "bert_base_ms": predictor.to_dict().get("reference_ms")}
    atomic_write_json(done, summary)
    return summary


# --- subprocess jobs (the CLI in parallel processes) ------------------------------------------------
@dataclasses.dataclass
class Job:
    name: str
    argv: list[str]
    out: Path
    done: Callable[[], bool]
    resumable: Callable[[], bool]
    ready: Callable[[], bool] = lambda: True


def run_jobs(jobs: Sequence[Job], parallel: int, log_dir: Path) -> None:
    """Run the unfinished jobs in order, ``parallel`` at a time (one torch thread each), each
    once its ``ready()`` holds (fine-tuning waits for its further training)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending = [j for j in jobs if not j.done()]
    running: list[tuple[Job, subprocess.Popen]] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while len(running) < parallel and any(j.ready() for j in pending):
            job = next(j for j in pending if j.ready())
            pending.remove(job)
            argv = job.argv + (["--resume"] if job.resumable() else [])
            log = open(log_dir / f"{job.name}.log", "a")
            print(f"[start] {job.name}", flush=True)
            running.append((job, subprocess.Popen([sys.executable, "-m", "autotinybert", *argv], stdout=log,
                                                  stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                print(f"[{'done' if proc.returncode == 0 else 'FAILED rc=%d' % proc.returncode}] {job.name}", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{job.name} failed; see {log_dir / (job.name + '.log')}")


def finetune_run(args, name: str, model: Path, out: Path, seed: int, teacher: Path | None = None) -> Job:
    """``finetune`` of ``model`` on args.tasks with the bench's budget (args.glue, max_train_examples,
    epochs, lr), 1 thread; it waits until ``model`` exists and is done when every task is scored.
    ``teacher``: a finished finetune run whose logits are distilled too (task-specific KD); the job
    waits for it."""
    argv = ["finetune", "--model", str(model), "--out", str(out), "--data-dir", str(args.glue),
            *[x for t in args.tasks for x in ("--task", t)], "--max-train-examples", str(args.max_train_examples),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", "32", "--warmup-ratio", "0.1",
            "--seed", str(seed), "--threads", "1", "--group-by-length", "--no-test-predictions", "--no-progress"]
    argv += ["--teacher", str(teacher)] if teacher else []
    return Job(name, argv, out, lambda: finished(out, args.tasks), lambda: (out / "config.yaml").is_file(),
               lambda: (model / "config.json").is_file() and (teacher is None or finished(teacher, args.tasks)))


def finished(run: Path, tasks: Sequence[str]) -> bool:
    """A finetune run has scored every task (its results.json grows task by task)."""
    results = run / "results.json"
    return results.is_file() and set(tasks) <= set(json.loads(results.read_text()).get("tasks", {}))


# --- results --------------------------------------------------------------------------------------
def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def cell(values: Sequence[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def publish(args, summary: dict, table: str) -> None:
    """summary.json and table.md in --work, copies at --json / --markdown, the table on stdout."""
    for path, write in ((args.work / "summary.json", lambda p: atomic_write_json(p, summary)),
                        (args.work / "table.md", lambda p: atomic_write_text(p, table)),
                        (args.json, lambda p: atomic_write_json(p, summary)),
                        (args.markdown, lambda p: atomic_write_text(p, table))):
        if path:
            write(path)
    print(table)
