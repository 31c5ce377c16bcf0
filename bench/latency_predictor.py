"""Latency predictor benchmark on this machine (issue 4).

Profiles architectures of the paper MLM space (1 thread, batch 1, seq 128) with torch eager and
ONNX Runtime, each within a wall-clock budget (chunks of --chunk architectures, resumed, so the
count is whatever fits), fits the MLP predictor and the FLOPs baseline, and prints held-out MAPE,
Spearman and the predictor's throughput. Writes a predicted-vs-measured PNG.

    PYTHONPATH=src python bench/latency_predictor.py --out bench-out/latency --minutes 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from autotinybert.latency import LatencySettings, fit, predictions_per_second, profile


def profile_within(engine: str, out: Path, minutes: float, chunk: int, max_samples: int, repeats: int,
                   clock: str) -> int:
    """Grow the planned list chunk by chunk (the plan of N is a prefix of the plan of N+k)."""
    settings = LatencySettings(engine=engine, threads=1, batch_size=1, seq_len=128, warmup=2, repeats=repeats,
                               clock=clock)
    deadline = time.monotonic() + minutes * 60
    samples = 0
    while samples < max_samples and time.monotonic() < deadline:
        samples = min(samples + chunk, max_samples)
        profile("paper-mlm", samples, out, settings, seed=0, resume=True, progress=False)
        print(f"  {engine}: {samples} architectures measured after {minutes * 60 - (deadline - time.monotonic()):.0f} s",
              flush=True)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/latency"))
    parser.add_argument("--minutes", type=float, default=7.0, help="profiling budget per engine")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--max-samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--engines", default="torch,onnxruntime")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--no-profile", action="store_true", help="only fit and report on existing profile files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for engine in args.engines.split(","):
        data = args.out / f"profile-{engine}.jsonl"
        start = time.monotonic()
        if args.no_profile:
            n = sum(1 for line in data.read_text().splitlines() if '"reference": false' in line)
        else:
            n = profile_within(engine, data, args.minutes, args.chunk, args.max_samples, args.repeats, args.clock)
        profile_s = time.monotonic() - start
        start = time.monotonic()
        predictor, report = fit(data)
        fit_s = time.monotonic() - start
        predictor.save(args.out / f"predictor-{engine}.json")
        rate = predictions_per_second(predictor)
        summary[engine] = {"architectures": n, "profile_s": profile_s, "fit_s": fit_s, "reference_ms": predictor.reference_ms,
                           "predictions_per_s": rate, **{k: report[k] for k in ("n_train", "n_heldout", "mlp", "baseline", "mlp_train")},
                           "heldout": report["heldout"]}
        print(f"{engine}: {n} archs ({report['n_train']} train / {report['n_heldout']} held out), BERT-base "
              f"{predictor.reference_ms:.1f} ms, profiling {profile_s:.0f} s, fit {fit_s:.0f} s")
        for name in ("mlp", "baseline"):
            m = report[name]
            print(f"  {name:<9} RMSE {m['rmse_ms']:.2f} ms  MAPE {m['mape_pct']:.2f}%  Spearman {m['spearman']:.4f}")
        print(f"  predict_features: {rate:,.0f} predictions/s (1.5M random rows)", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "latency_predicted_vs_measured.png", args.clock)


def plot(summary: dict, path: Path, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 5), squeeze=False)
    for ax, (engine, s) in zip(axes[0], summary.items()):
        held = s["heldout"]
        hi = max(held["measured_ms"]) * 1.05
        ax.plot([0, hi], [0, hi], color="grey", lw=1, label="y = x")
        ax.scatter(held["measured_ms"], held["baseline_ms"], s=12, marker="x", color="tab:orange",
                   label=f"FLOPs baseline (MAPE {s['baseline']['mape_pct']:.1f}%)")
        ax.scatter(held["measured_ms"], held["mlp_ms"], s=14, color="tab:blue",
                   label=f"MLP (MAPE {s['mlp']['mape_pct']:.1f}%, rho {s['mlp']['spearman']:.3f})")
        ax.set(title=f"{engine}: {s['n_heldout']} held-out archs (of {s['architectures']})",
               xlabel="measured median latency (ms)", ylabel="predicted latency (ms)", xlim=(0, hi), ylim=(0, hi))
        ax.legend(fontsize=8)
    fig.suptitle(f"paper MLM space, 1 thread, batch 1, seq 128, {clock} clock (2 shared CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
