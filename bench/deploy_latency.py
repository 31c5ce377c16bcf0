"""Latency of what ships (issue 14), measured side by side on this machine.

``forms``: named architectures (BERT-base, all-MiniLM-L6-v2's shape, S1, S4, KD-S2, KD-S4) in
every deployed form -- torch eager fp32 / dynamic int8, ONNX Runtime fp32 / optimised / int8 /
optimised int8, and BERT-base's optimised graph exported through transformers' SDPA attention
(unfused) -- all timed in ONE interleaved run (`time_interleaved`: 1 thread, batch 1, seq 128),
with the ratios to torch fp32 and the fused operators of each optimised graph.

``predictor``: predictor selection on recorded profiles: a user profiles N architectures and runs
``latency fit`` (80 % train / 20 % held out, K-fold choice between MLP, costs and FLOPs); the
predictor is then scored on every profiled architecture it never saw. Repeated over seeds.

    PYTHONPATH=src python bench/deploy_latency.py forms --out bench-out/deploy/forms.json --clock cpu
    PYTHONPATH=src python bench/deploy_latency.py predictor --data docs/results/latency-bench/latency-profile-torch.jsonl.gz \
        --sizes 60 300 --seeds 5 --out bench-out/deploy/predictor-torch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ARCHS = {"BERT-base": "L12-H768-F3072-A12-Q768", "all-MiniLM-L6-v2": "L6-H384-F1536-A12-Q384",
         "S1": "L5-H564-F1054-A8-Q512", "S4": "L3-H320-F608-A4-Q256", "KD-S2": "L5-H324-F600-A12-Q324",
         "KD-S4": "L4-H256-F480-A12-Q192",
         # the small end, where int8's overheads may stop paying
         "T2": "L2-H192-F384-A3-Q192", "T1": "L1-H128-F256-A2-Q128"}
FORMS = {  # name: LatencySettings fields
    "torch fp32": {"engine": "torch"},
    "torch int8": {"engine": "torch", "quantize": "int8"},
    "ORT fp32": {"engine": "onnxruntime"},
    "ORT optimised": {"engine": "onnxruntime", "optimize": True},
    "ORT int8": {"engine": "onnxruntime", "quantize": "int8"},
    "ORT optimised int8": {"engine": "onnxruntime", "optimize": True, "quantize": "int8"},
}


def _load() -> float:
    return os.getloadavg()[0]


def forms(args: argparse.Namespace) -> dict:
    import torch

    from autotinybert.deploy import fusion_counts, onnx_forms
    from autotinybert.latency import LatencySettings, build_model
    from autotinybert.latency.runner import onnx_feeds, onnx_session, summarize, time_interleaved
    from autotinybert.latency.timing import _onnx_run, _torch_run, torch_threads
    from autotinybert.space import Arch

    runs, fused = {}, {}
    start, load_before = time.time(), _load()
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1), torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, text in ARCHS.items():
            arch = Arch.parse(text)
            for form, fields in ((f, FORMS[f]) for f in args.forms):
                settings = LatencySettings(clock=args.clock, **fields)
                directory = Path(tmp) / f"{name}-{form}".replace(" ", "_")
                runs[(name, form)] = (_torch_run(arch, settings) if settings.engine == "torch"
                                      else _onnx_run(arch, settings, directory))
                if form == "ORT optimised":
                    fused[name] = fusion_counts(directory / "model.opt.onnx")
            if arch.is_bert_compatible and args.sdpa:  # the cost of losing attention fusion: the SDPA-traced graph
                path = onnx_forms(build_model(arch), Path(tmp) / f"{name}-sdpa", ("optimized",), fusable=False)["optimized"]
                fused[f"{name} (SDPA export)"] = fusion_counts(path)
                session, feeds = onnx_session(path, 1), onnx_feeds(1, 128, 30522)
                runs[(name, "ORT optimised, SDPA export")] = lambda s=session, f=feeds: s.run(None, f)
        built = time.time() - start
        timer = time.process_time if args.clock == "cpu" else time.perf_counter
        timed = time_interleaved(runs, warmup=args.warmup, repeats=args.repeats, max_repeats=args.max_repeats,
                                 tolerance=args.tolerance, noise_limit=0.1, timer=timer)
    rows = []
    for (name, form), result in timed.items():
        stats = summarize(result["times_ms"])
        base = summarize(timed[(name, "torch fp32")]["times_ms"])["median_ms"]
        rows.append({"arch_name": name, "arch": ARCHS[name], "form": form, **stats, "speedup_vs_torch_fp32": base / stats["median_ms"],
                     "remeasured": result["remeasured"], "noisy": result["noisy"]})
    summary = {"clock": args.clock, "threads": 1, "batch_size": 1, "seq_len": 128, "build_seconds": round(built, 1),
               "total_seconds": round(time.time() - start, 1), "load_before": load_before, "load_after": _load(),
               "cpus": os.cpu_count(), "rows": rows, "fusions": fused}
    _print_forms(summary)
    return summary


def _print_forms(summary: dict) -> None:
    forms = list(dict.fromkeys(r["form"] for r in summary["rows"]))
    print(f"clock {summary['clock']}, 1 thread, batch 1, seq 128; load {summary['load_before']:.2f} -> "
          f"{summary['load_after']:.2f} on {summary['cpus']} CPUs; {summary['total_seconds']} s")
    print("| architecture | " + " | ".join(forms) + " |")
    print("|---|" + "---|" * len(forms))
    for name in dict.fromkeys(r["arch_name"] for r in summary["rows"]):
        cells = []
        for form in forms:
            row = next((r for r in summary["rows"] if r["arch_name"] == name and r["form"] == form), None)
            cells.append("-" if row is None else f"{row['median_ms']:.1f} ms ({row['speedup_vs_torch_fp32']:.2f}x, "
                                                 f"noise {100 * row['noise']:.0f}%)")
        print(f"| {name} {ARCHS[name]} | " + " | ".join(cells) + " |")
    for name, counts in summary["fusions"].items():
        print(f"fusions {name}: {counts}")


def predictor(args: argparse.Namespace) -> dict:
    from autotinybert import latency
    from autotinybert.space import Arch

    # Drift corrected once over the whole file (what `latency fit` does for a user's whole profile),
    # so that every draw below trains and scores on the same numbers.
    raw = latency.read_records(args.data)
    records = [{**{k: v for k, v in r.items() if k != "anchor"}, "latency": {**r["latency"], "median_ms": float(ms)}}
               for r, ms in zip(raw, latency.drift_corrected_ms(raw))]
    samples = [r for r in records if not r.get("reference")]
    reference = [r for r in records if r.get("reference")]
    features = latency.features_of(Arch.parse(r["arch"]) for r in samples)
    measured = np.array([r["latency"]["median_ms"] for r in samples])
    noise = [r["latency"]["iqr_ms"] / r["latency"]["median_ms"] for r in samples]
    out = {"data": str(args.data), "profiled": len(samples), "median_noise": float(np.median(noise)), "sizes": {}}
    print(f"{args.data}: {len(samples)} architectures, median IQR/median {100 * np.median(noise):.1f}%")
    for size in args.sizes:
        if size >= len(samples):
            print(f"  {size}: only {len(samples)} profiled; skipped")
            continue
        rows = []
        for seed in range(args.seeds):
            order = np.random.default_rng(seed).permutation(len(samples))
            chosen_idx, unseen = order[:size], order[size:]
            started = time.time()
            fitted, report = latency.fit(reference + [samples[i] for i in chosen_idx], seed=seed, epochs=args.epochs)
            seconds = time.time() - started
            row = {"seed": seed, "chosen": report["chosen"], "fit_seconds": round(seconds, 1), "n_unseen": len(unseen),
                   "cv_mape": {k: v["mape_pct"] for k, v in report["cross_validation"].items()}}
            held_out = set(report["heldout"]["arch"])
            train = [i for i in chosen_idx if samples[i]["arch"] not in held_out]  # what fit() trained on
            models = {"selected": fitted,
                      "mlp": dataclasses.replace(fitted, kind="mlp", linear=None),
                      "flops": dataclasses.replace(fitted, kind="flops", linear=fitted.baseline),
                      "costs": dataclasses.replace(fitted, kind="costs", linear=latency.fitting.fit_costs(
                          features[train], measured[train], 128))}
            for kind, model in models.items():
                row[kind] = latency.metrics(model.predict_features(features[unseen]), measured[unseen])["mape_pct"]
            rows.append(row)
            print(f"  {size} profiled (seed {seed}): chosen {row['chosen']:<5} unseen MAPE {row['selected']:.2f}% | "
                  f"MLP {row['mlp']:.2f}% costs {row['costs']:.2f}% FLOPs {row['flops']:.2f}% on {len(unseen)}; "
                  f"fit {seconds:.0f} s", flush=True)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("selected", "mlp", "costs", "flops")}
        never_worse = all(r["selected"] <= min(r["mlp"], r["flops"]) + 1e-9 for r in rows)
        print(f"  {size}: mean unseen MAPE chosen {mean['selected']:.2f}% | MLP {mean['mlp']:.2f}% costs "
              f"{mean['costs']:.2f}% FLOPs {mean['flops']:.2f}%; chosen <= min(MLP, FLOPs) in every seed: {never_worse}")
        out["sizes"][str(size)] = {"runs": rows, "mean": mean, "never_worse": never_worse}
    return out


def anchor(args: argparse.Namespace) -> dict:
    """What the drift anchor buys on a profile: the costs predictor (seconds to fit) trained on
    ``size`` random architectures and scored on the rest, with the medians as measured, corrected
    chunk by chunk, and (profiles that have it) round by round (``paced``); the same draws for all."""
    from autotinybert import latency
    from autotinybert.latency.fitting import fit_costs
    from autotinybert.latency.predictor import predict_linear
    from autotinybert.space import Arch

    records = latency.read_records(args.data)
    keep = [i for i, r in enumerate(records) if not r.get("reference")]
    features = latency.features_of(Arch.parse(records[i]["arch"]) for i in keep)
    seq_len = int(records[keep[0]]["fingerprint"].get("seq_len", 128))  # as `latency.fit` reads it
    targets = {"as_measured": np.array([float(records[i]["latency"]["median_ms"]) for i in keep]),
               "drift_corrected": latency.drift_corrected_ms(records, paced=False)[keep]}
    if all(records[i].get("paced") for i in keep):  # profiles timed with a pace in every round
        targets["paced"] = latency.drift_corrected_ms(records)[keep]
    out = {"data": str(args.data), "profiled": len(keep), "sizes": {}}
    for size in args.sizes:
        mape = {name: [] for name in targets}
        for seed in range(args.seeds):
            order = np.random.default_rng(seed).permutation(len(keep))
            train, unseen = order[:size], order[size:]
            for name, ms in targets.items():
                model = fit_costs(features[train], ms[train], seq_len)
                mape[name].append(latency.metrics(predict_linear(model, features[unseen], seq_len),
                                                  ms[unseen])["mape_pct"])
        out["sizes"][str(size)] = {name: float(np.mean(v)) for name, v in mape.items()}
        print(f"  {size} profiled, costs predictor, mean unseen MAPE over {args.seeds} draws: "
              + ", ".join(f"{name} {np.mean(v):.2f}%" for name, v in mape.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forms")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    f.add_argument("--warmup", type=int, default=2)
    f.add_argument("--repeats", type=int, default=10)
    f.add_argument("--max-repeats", type=int, default=30)
    f.add_argument("--tolerance", type=float, default=0.02)
    f.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    f.add_argument("--no-sdpa", dest="sdpa", action="store_false", help="skip the unfused (SDPA-traced) graphs")
    p = sub.add_parser("predictor")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[60, 300])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3000)
    p.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("anchor", help="costs predictor on medians as measured vs drift-corrected by chunk and by round (seconds)")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--sizes", type=int, nargs="+", default=[60, 300])
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"forms": forms, "predictor": predictor, "anchor": anchor}[args.command](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "bench/deploy_latency.py " + args.command, **result}, indent=1))


if __name__ == "__main__":
    main()
