"""Robust timing on a noisy machine, and the standalone runner of a latency bundle.

Self-contained on purpose: `autotinybert latency bundle` copies this file next to the ONNX models
of a profile plan as ``run_bundle.py``, to be run on a device (phone, edge box) that cannot install
torch or autotinybert. It imports only the standard library at module level; numpy and
onnxruntime are imported by the runner's ``main`` only. The package imports its timing core from
here (`time_interleaved`, `summarize`, `machine_fingerprint`), so the device and the development
machine measure the same way.

Usage on the device (writes the JSONL that ``autotinybert latency fit --data`` reads)::

    python run_bundle.py [--out profile.jsonl] [--clock wall|cpu] [--threads N] [--resume]
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

# Defaults of the robust measurement (also LatencySettings' declared defaults).
TOLERANCE = 0.02
MAX_REPEATS = 100
NOISE_LIMIT = 0.10


# --- statistics --------------------------------------------------------------------------------
def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile, without numpy."""
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median and p90 are the numbers we use; min/max/quartiles make outliers visible; ``noise`` is
    IQR / median, the measurement's own spread."""
    t = sorted(float(x) for x in times_ms)
    q1, median, q3, p90 = (_percentile(t, q) for q in (25, 50, 75, 90))
    return {"median_ms": median, "p90_ms": p90, "mean_ms": sum(t) / len(t), "min_ms": t[0], "max_ms": t[-1],
            "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "repeats": len(t),
            "noise": (q3 - q1) / median if median > 0 else 0.0}


def paced_summary(times_ms: Sequence[float], pace_ms: Sequence[float]) -> Dict[str, float]:
    """Each timing divided by the pace's median in its round: ``ratio`` (the median of those
    quotients, the model's latency in units of the pace's) and ``noise`` (their IQR / median)."""
    quotients = summarize([t / p for t, p in zip(times_ms, pace_ms)])
    return {"ratio": quotients["median_ms"], "noise": quotients["noise"]}


def _stable(times: List[float], last_round: int, minimum: int, tolerance: float) -> bool:
    """The median moved less than ``tolerance`` (relative) when the last round was added."""
    if len(times) < minimum or last_round == 0 or len(times) - last_round < 1:
        return False
    before, after = statistics.median(times[:-last_round]), statistics.median(times)
    return abs(after - before) <= tolerance * after


def time_interleaved(runs: Dict[Hashable, Callable[[], Any]], *, warmup: int, repeats: int,
                     max_repeats: int = MAX_REPEATS, tolerance: float = TOLERANCE, noise_limit: float = NOISE_LIMIT,
                     timer: Callable[[], float] = time.perf_counter, seed: int = 0,
                     per_round: int = 1, pace: Optional[Hashable] = None) -> Dict[Hashable, Dict[str, Any]]:
    """Time several callables in interleaved rounds until each median is stable.

    A burst of load on a shared machine then hits every model a little instead of one model a lot.
    Each round times ``per_round`` calls of every unfinished model (in a shuffled order). One call
    per round (the default) is how a shipped model is timed beside others (`latency compare`):
    consecutive calls of one small model find its weights still in the CPU cache and ran 7-12 %
    faster than the same model timed between others (3 ms models; within 2 % from 15 ms up:
    bench/cache_warmth.py), which made every small model slower than its profile promised. A model
    is finished once it has ``repeats`` timings and its median moved less than ``tolerance``
    (relative) in the last round, or at ``max_repeats``. A model whose noise (IQR / median) then
    exceeds ``noise_limit`` is an outlier: its timings are discarded and it is measured once more
    (``remeasured``); ``noisy`` marks one still above the limit (the machine is too busy to trust).
    Returns ``{key: {"times_ms": [...], "rounds": n, "remeasured": bool, "noisy": bool}}``.

    ``pace``: the key of a reference run timed in *every* round, also after its own median is
    stable; each result then has ``pace_ms``, aligned with ``times_ms``: the pace's median in the
    round of that timing. A shared machine's speed moves within seconds; dividing each timing by
    the pace's of the same round (`paced_summary`) removes what a chunk-level correction cannot.
    """
    rng = random.Random(seed)
    max_repeats = max(max_repeats, repeats)
    for run in runs.values():
        for _ in range(warmup):
            run()

    def timed(run: Callable[[], Any]) -> float:
        start = timer()
        run()
        return (timer() - start) * 1000.0

    def measure(keys: List[Hashable]) -> Dict[Hashable, Dict[str, Any]]:
        times: Dict[Hashable, List[float]] = {key: [] for key in keys}
        paces: Dict[Hashable, List[float]] = {key: [] for key in keys}
        rounds = {key: 0 for key in keys}
        active = list(keys)
        while active:
            order = active if pace is None or pace in active else [*active, pace]  # a finished pace still paces
            rng.shuffle(order)
            calls = {key: min(per_round, max_repeats - len(times[key])) if key in active else per_round for key in order}
            this_round = {key: [timed(runs[key]) for _ in range(calls[key])] for key in order}
            pace_ms = statistics.median(this_round[pace]) if pace is not None else None
            for key in active:
                times[key] += this_round[key]
                rounds[key] += 1
                if pace_ms is not None:
                    paces[key] += [pace_ms] * calls[key]
            active = [key for key in active if len(times[key]) < max_repeats
                      and not _stable(times[key], per_round, repeats, tolerance)]
        return {key: {"times_ms": times[key], "rounds": rounds[key],
                      **({"pace_ms": paces[key]} if pace is not None else {})} for key in keys}

    results = {key: {**result, "remeasured": False} for key, result in measure(list(runs)).items()}
    outliers = [key for key, result in results.items() if summarize(result["times_ms"])["noise"] > noise_limit]
    if outliers:
        for key, result in measure(outliers).items():
            results[key] = {**result, "remeasured": True}
    for result in results.values():
        result["noisy"] = summarize(result["times_ms"])["noise"] > noise_limit
    return results


# --- fingerprint -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> Optional[int]:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo; None where unavailable."""
    try:
        cores, physical = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
        return len(cores) or None
    except OSError:
        return None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def load_average() -> Optional[List[float]]:
    """The host's 1, 5 and 15 minute load averages (None where the platform has none): recorded
    beside every timing, since a busy shared machine is what makes timings disagree."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_fingerprint(shape: Dict[str, Any], modules: Sequence[str] = ("torch", "onnxruntime", "transformers",
                                                                          "numpy")) -> Dict[str, Any]:
    """Hardware + software + ``shape`` (engine, batch, sequence, threads, clock, form) of a measurement."""
    versions = {name: _version(name) for name in modules}
    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": _physical_cores(),
            "machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "versions": versions, "engine_version": versions.get("torch" if shape["engine"] == "torch" else "onnxruntime"),
            **shape}


# --- the bundle runner -------------------------------------------------------------------------
PLAN_FILE = "plan.json"


def onnx_session(path: Path, threads: Optional[int] = None):
    """A CPU InferenceSession: ``threads`` intra-op threads, sequential, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_feeds(batch_size: int, seq_len: int, vocab_size: int):
    """Full-length random ids (as in the paper), one segment; fixed seed."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    return {"input_ids": rng.integers(1, vocab_size, shape, dtype=np.int64),
            "attention_mask": np.ones(shape, dtype=np.int64), "token_type_ids": np.zeros(shape, dtype=np.int64)}


def _done(out: Path) -> Dict[str, Dict[str, Any]]:
    done = {}
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["arch"]] = record
            except (ValueError, KeyError):
                pass  # a torn last line: measured again
    return done


def run_bundle(bundle: Path, out: Path, *, clock: Optional[str] = None, threads: Optional[int] = None,
               resume: bool = False, progress: bool = True) -> List[Dict[str, Any]]:
    """Time every model of ``bundle``'s plan with onnxruntime; append one JSON record per model to ``out``."""
    plan = json.loads((bundle / PLAN_FILE).read_text(encoding="utf-8"))
    timing = dict(plan["timing"])
    shape = dict(plan["shape"])
    if clock:
        shape["clock"] = clock
    if threads:
        shape["threads"] = threads
    if shape["clock"] == "cpu" and shape["threads"] != 1:
        sys.exit("--clock cpu sums CPU time over threads, which is latency only with --threads 1")
    timer = time.perf_counter if shape["clock"] == "wall" else time.process_time
    done = _done(out) if resume else {}
    if out.exists() and not resume:
        out.unlink()
    fingerprint = machine_fingerprint(shape, modules=("onnxruntime", "numpy"))
    feeds = onnx_feeds(shape["batch_size"], shape["seq_len"], plan["vocab_size"])
    todo = [entry for entry in plan["models"] if entry["arch"] not in done]
    chunk = max(1, int(timing.get("interleave", 8)))
    for begin in range(0, len(todo), chunk):
        entries = todo[begin:begin + chunk]
        sessions = {e["arch"]: onnx_session(bundle / e["file"], shape["threads"]) for e in entries}
        timed = time_interleaved({arch: (lambda s=s: s.run(None, feeds)) for arch, s in sessions.items()},
                                 warmup=timing["warmup"], repeats=timing["repeats"], max_repeats=timing["max_repeats"],
                                 tolerance=timing["tolerance"], noise_limit=timing["noise_limit"], timer=timer)
        with open(out, "a", encoding="utf-8") as handle:
            for entry in entries:
                result = timed[entry["arch"]]
                record = {"arch": entry["arch"], "latency": summarize(result["times_ms"]),
                          "rounds": result["rounds"], "remeasured": result["remeasured"], "noisy": result["noisy"],
                          "parameters": entry["parameters"], "flops": entry["flops"], "fingerprint": fingerprint,
                          "reference": entry["reference"], "features": entry["features"], "space": entry["space"],
                          "seed": plan["seed"], "bundle": True}
                handle.write(json.dumps(record) + "\n")
                done[entry["arch"]] = record
                if progress:
                    print(f"{entry['arch']}: {record['latency']['median_ms']:.2f} ms "
                          f"(noise {100 * record['latency']['noise']:.1f}%)", flush=True)
            handle.flush()
            os.fsync(handle.fileno())
        noisy = [e["arch"] for e in entries if timed[e["arch"]]["noisy"]]
        if noisy:
            print(f"warning: {len(noisy)} measurement(s) noisier than {timing['noise_limit']:.0%} IQR/median "
                  f"({', '.join(noisy)}): the device is too busy to trust them", file=sys.stderr)
    return [done[e["arch"]] for e in plan["models"]]


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="time the ONNX models of this bundle (needs onnxruntime and numpy)")
    parser.add_argument("--bundle", type=Path, default=here, help="the bundle directory (default: this file's)")
    parser.add_argument("--out", type=Path, default=Path("profile.jsonl"), help="JSONL for 'autotinybert latency fit'")
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None, help="override the bundle's clock")
    parser.add_argument("--threads", type=int, default=None, help="override the bundle's intra-op threads")
    parser.add_argument("--resume", action="store_true", help="keep --out's records and time only what is missing")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    records = run_bundle(args.bundle, args.out, clock=args.clock, threads=args.threads, resume=args.resume,
                         progress=not args.quiet)
    print(f"{len(records)} measurements in {args.out}; fit with: autotinybert latency fit --data {args.out} --out predictor.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
