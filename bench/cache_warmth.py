"""How much faster a model times when it is called several times in a row (its weights stay in the
CPU cache) than when every call follows other models' calls, as in `autotinybert latency compare`.

Times a few architectures and BERT-base in one process, 1 thread, batch 1, sequence 128, both ways,
alternating the two ways (ABBA order) ``--trials`` times; prints each model's median per way and their ratio.
This is why `latency profile` times each model once per round (docs/latency.md, "Robust measurement").

    PYTHONPATH=src python bench/cache_warmth.py [--clock cpu] [--trials 4] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autotinybert.latency import LatencySettings, build_model
from autotinybert.latency.runner import load_average, time_interleaved
from autotinybert.latency.timing import DRIFT_ANCHOR, torch_threads
from autotinybert.space import BERT_BASE, Arch

ARCHS = ("L1-H212-F672-A12-Q300", "L3-H300-F2184-A12-Q180", "L5-H548-F1184-A12-Q744", str(DRIFT_ANCHOR), str(BERT_BASE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each model per way and trial")
    parser.add_argument("--in-a-row", type=int, default=5, help="consecutive calls per round in the warm way")
    args = parser.parse_args()
    settings = LatencySettings(clock=args.clock)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 30522, (1, 128), generator=generator),
              "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    models = {arch: build_model(Arch.parse(arch)) for arch in ARCHS}
    runs = {arch: (lambda model=model: model(**inputs)) for arch, model in models.items()}
    medians: dict[str, dict[int, list[float]]] = {arch: {1: [], args.in_a_row: []} for arch in ARCHS}
    with torch_threads(1), torch.inference_mode():
        for trial in range(args.trials):
            for in_a_row in (1, args.in_a_row)[::1 if trial % 2 == 0 else -1]:  # ABBA: drift hits both ways alike
                timed = time_interleaved(runs, warmup=3, repeats=args.calls, max_repeats=args.calls, tolerance=0.0,
                                         noise_limit=float("inf"), timer=settings.timer(), seed=trial,
                                         per_round=in_a_row)
                for arch in ARCHS:
                    medians[arch][in_a_row].append(statistics.median(timed[arch]["times_ms"]))
    print(f"| architecture | once per round (ms) | {args.in_a_row} in a row (ms) | once / in a row |")
    print("|---|---:|---:|---:|")
    for arch in ARCHS:
        once, row = statistics.median(medians[arch][1]), statistics.median(medians[arch][args.in_a_row])
        print(f"| {arch} | {once:.2f} | {row:.2f} | {once / row:.3f} |")
    print(f"{args.clock} clock, {args.trials} trial(s) of {args.calls} timed calls per model and way; "
          f"load average {load_average()}")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"{time.time() - started:.0f} s")
