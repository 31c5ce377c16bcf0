"""What one proxy evaluation costs, with the teacher's outputs recorded once vs recomputed per candidate.

The search scores every candidate on the same fixed batches; `RecordedTeacher` keeps the teacher's
outputs on them, and `--metric kd_loss` skips the MLM head. This times, side by side in one process
(process CPU clock, 1 thread), both ways of scoring the same architectures, alternating, and checks
that they give the same KD loss:

    PYTHONPATH=src python bench/proxy_cost.py --supernet RUN/pretrain --teacher builtin:all-minilm-l6-v2 \\
        --valid-corpus ../shared/data/corpus/valid/wikipedia.txt --archs 6
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    import torch

    from autotinybert.evaluators import ProxyEvaluator
    from autotinybert.pretrain import validation_row

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernet", type=Path, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--valid-corpus", nargs="+", required=True)
    p.add_argument("--archs", type=int, default=6, help="random architectures of the SuperPLM's space")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    proxy = ProxyEvaluator(args.supernet, args.valid_corpus, metric="kd_loss", teacher=args.teacher,
                           batch_size=args.batch_size, batches=args.batches, cache_dir=args.cache_dir)
    rng = random.Random(0)
    archs = [proxy.space.sample(rng) for _ in range(args.archs)]
    ways = {"recomputed": lambda a: validation_row(proxy.model, a, proxy.fixed, proxy.teacher, mlm=True),
            "recorded": lambda a: validation_row(proxy.model, a, proxy.fixed, proxy.targets, mlm=False)}
    seconds = {name: [] for name in ways}
    for arch in archs:
        losses = {}
        for name, score in ways.items():
            start = time.process_time()
            losses[name] = score(arch)["kd_loss"]
            seconds[name].append(time.process_time() - start)
        assert abs(losses["recorded"] - losses["recomputed"]) <= 1e-5 * abs(losses["recomputed"]), (arch, losses)
        print(f"{arch}: kd_loss {losses['recorded']:.4f}; "
              + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in ways), flush=True)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = medians["recomputed"] / medians["recorded"]
    print(f"median CPU seconds per candidate: recomputed {medians['recomputed']:.2f}, recorded "
          f"{medians['recorded']:.2f} ({ratio:.2f}x faster); same KD loss for all {len(archs)}")
    if args.out:
        args.out.write_text(json.dumps({"archs": [str(a) for a in archs], "seconds": seconds, "median": medians,
                                        "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
