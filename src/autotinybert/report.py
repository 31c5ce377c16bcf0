"""Tables and plots built from the files stages write (never from live models)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .errors import UserError


def read_validation_curves(metrics_csv: str | Path, column: str = "mlm_accuracy") -> dict[str, list[tuple[int, float]]]:
    """``{arch: [(step, value), ...]}`` from a pre-training ``metrics.csv``."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise UserError(f"{path} does not exist; point at the metrics.csv of a pretrain run")
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "valid" and row.get(column):
                curves[row["arch"]].append((int(row["step"]), float(row[column])))
    return dict(curves)


def plot_validation_curves(metrics_csv: str | Path, out_png: str | Path, column: str = "mlm_accuracy",
                           title: str | None = None) -> Path:
    """One line per validation-panel architecture: ``column`` against the training step."""
    plt = _required_pyplot()
    curves = read_validation_curves(metrics_csv, column)
    if not curves:
        raise UserError(f"{metrics_csv} has no validation rows with {column}")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for arch, points in sorted(curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, label=arch)
    _label(ax, "training step", column.replace("_", " "),
           title or f"validation {column.replace('_', ' ')} of the panel architectures")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_pareto(results_json: str | Path, out_png: str | Path, ylabel: str = "fitness") -> Path:
    """Predicted latency vs fitness of every evaluated architecture, the Pareto front and each
    target's window and best architecture (from a search ``results.json`` + ``state.json``)."""
    import json

    plt = _required_pyplot()
    results_json = Path(results_json)
    results = json.loads(results_json.read_text(encoding="utf-8"))
    state = json.loads((results_json.parent / "state.json").read_text(encoding="utf-8"))
    points = state["evaluations"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.scatter([p["latency_ms"] for p in points], [p["fitness"] for p in points], s=8, c="0.6",
               label=f"evaluated ({len(points)})")
    front = results["pareto_front"]
    ax.step([p["latency_ms"] for p in front], [p["fitness"] for p in front], where="post", c="tab:red",
            marker="o", markersize=3, label="Pareto front")
    for i, target in enumerate(results["targets"]):
        low, high = target["window_ms"]
        ax.axvspan(low, high, alpha=0.08, color=f"C{i}")
        best = target["best"]
        ax.scatter([best["latency_ms"]], [best["fitness"]], marker="*", s=120, color=f"C{i}", zorder=3,
                   label=f"{target['target']['name']}: {best['arch']}")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title("architecture search: predicted latency vs fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# --- the `report` command: one run directory of `develop` -> HTML + markdown + model cards ----
def _read_json(path: Path, default=None):
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); rerun the stage that writes it") from None


def load_run(run_dir: str | Path) -> dict:
    """Everything the report shows, read from the files of a `develop` run (no models loaded)."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    if manifest is None:
        raise UserError(f"{run_dir} is not a develop run (no manifest.json); point at the --out of "
                        "'autotinybert develop' or 'autotinybert demo'")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise UserError(f"{run_dir / 'manifest.json'} is not a develop manifest; point at the --out of "
                        "'autotinybert develop' or 'autotinybert demo'")
    if not any(isinstance(e, dict) and e.get("status") == "done" for e in manifest.get("stages", {}).values()):
        raise UserError(f"{run_dir} has no finished stage yet (manifest.json); nothing to report")
    from .files import relocate

    # Recorded paths are absolute; a run copied elsewhere (e.g. from a cluster) is read where it is now.
    stages = relocate(manifest.get("stages", {}), manifest.get("run_dir"), str(run_dir.absolute()))

    def outputs(name: str) -> dict:
        return (stages.get(name) or {}).get("outputs") or {}

    supernet = outputs("pretrain").get("supernet")
    search_results = outputs("search").get("results")
    run = {"dir": run_dir, "manifest": manifest, "config": manifest.get("config", {}), "stages": stages,
           "supernet": supernet,
           "supernet_config": _read_json(Path(supernet) / "config.json", {}) if supernet else {},
           "metrics_csv": Path(supernet) / "metrics.csv" if supernet else None,
           "latency_fit": _read_json(Path(_searched_predictor(outputs)).with_name("results.json"), None)
           if _searched_predictor(outputs) else None,
           "searched_form": outputs("search").get("form"),
           "search": _read_json(search_results, None) if search_results else None,
           "verify": _read_json(Path(outputs("search")["verify"]), None) if outputs("search").get("verify") else None,
           "search_state": _read_json(Path(search_results).with_name("state.json"), None) if search_results else None,
           "models": _model_rows(outputs("extract"), outputs("further_train"), outputs("finetune"),
                                 outputs("search")),
           "reference": _reference_row(outputs("extract"), outputs("finetune"))}
    return run


def _searched_predictor(outputs: Callable[[str], dict]) -> str | None:
    """The predictor the search used (the chosen form's, with latency.form auto; runs before that
    option recorded only the latency stage's one)."""
    return outputs("search").get("predictor") or outputs("latency").get("predictor")


def _reference_row(extract: dict, finetune: dict) -> dict | None:
    """The pre-trained source a run started from (``pretrain.init_from``), as a model row."""
    reference = extract.get("reference")
    if not reference:
        return None
    run_dir = (finetune.get("runs") or {}).get("source")
    return {"target": "source", "arch": reference["arch"], "final": reference["name"], "further_run": None,
            "export": {"parameters": reference["parameters"]}, "latency": _read_json(Path(reference["latency"]), {}),
            "search": {}, "finetune": _read_json(Path(run_dir) / "results.json", None) if run_dir else None,
            "finetune_int8": _read_json(Path(run_dir) / "int8-eval" / "results.json", None) if run_dir else None,
            "finetune_dir": run_dir}


def _model_rows(extract: dict, further: dict, finetune: dict, search: dict) -> list[dict]:
    rows = []
    results = (_read_json(search["results"], {}) or {}) if search.get("results") else {}
    best = {row["target"]: row for row in results.get("best", [])}
    # What shipped may be a runner-up of the search (verified before shipping): its own visit.
    visits = {(t["target"]["name"], v["arch"]): v for t in results.get("targets", []) for v in t.get("history", [])}
    for target, model in (extract.get("models") or {}).items():
        final = (further.get("models") or {}).get(target, model)
        run_dir = (finetune.get("runs") or {}).get(target)
        rows.append({
            "target": target, "arch": model["arch"], "extracted": model["path"], "final": final["path"],
            "further_run": final.get("run"),
            "export": _read_json(Path(model["path"]) / "results.json", {}),
            "latency": _read_json(Path(model["path"]) / "latency.json", {}),
            "search": {**best.get(target, {}), **visits.get((target, model["arch"]), {})},
            "finetune": _read_json(Path(run_dir) / "results.json", None) if run_dir else None,
            "finetune_int8": _read_json(Path(run_dir) / "int8-eval" / "results.json", None) if run_dir else None,
            "finetune_dir": run_dir,
        })
    return rows


def _required_pyplot():
    plt = _pyplot()
    if plt is None:
        raise UserError("plots need the plots extra: pip install 'autotinybert[plots]'")
    return plt


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (its memory freed)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and a small legend: the look of every report plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def pareto_figure(run: dict) -> bytes | None:
    """Predicted latency vs proxy fitness of every evaluated architecture; the chosen ones starred."""
    plt, search, state = _pyplot(), run["search"], run["search_state"]
    if plt is None or not search or not state:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    points = state["evaluations"]
    ax.scatter([p["latency_ms"] for p in points], [p["fitness"] for p in points], s=10, c="0.6",
               label=f"evaluated ({len(points)})")
    front = search["pareto_front"]
    ax.step([p["latency_ms"] for p in front], [p["fitness"] for p in front], where="post", c="tab:red",
            marker="o", markersize=3, label="Pareto front")
    for i, target in enumerate(search["targets"]):
        low, high = target["window_ms"]
        ax.axvspan(low, high, alpha=0.08, color=f"C{i}")
        best = target["best"]
        ax.scatter([best["latency_ms"]], [best["fitness"]], marker="*", s=220, color=f"C{i}", edgecolor="black",
                   zorder=3, label=f"chosen for {target['target']['name']}: {best['arch']}")
    _label(ax, "predicted latency (ms)", f"proxy fitness ({search.get('metric', 'fitness')})",
           "search: latency vs score (stars: the exported models)")
    return _png(fig)


def latency_figure(run: dict) -> bytes | None:
    """Predicted vs measured latency: the predictor's held-out profile points and every exported model."""
    plt = _pyplot()
    models = [m for m in run["models"] if m["latency"]]
    if plt is None or not models:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 5), dpi=110)
    heldout = (run["latency_fit"] or {}).get("heldout")
    values = [m["latency"]["latency"]["median_ms"] for m in models] + [m["latency"]["predicted_ms"] for m in models]
    if heldout:
        ax.scatter(heldout["measured_ms"], heldout["mlp_ms"], s=14, c="0.6", label="profile, held out")
        values += heldout["measured_ms"] + heldout["mlp_ms"]
    for i, m in enumerate(models):
        ax.scatter([m["latency"]["latency"]["median_ms"]], [m["latency"]["predicted_ms"]], marker="*", s=220,
                   color=f"C{i}", edgecolor="black", zorder=3, label=f"{m['target']}: {m['arch']}")
    low, high = min(values) * 0.9, max(values) * 1.1
    ax.plot([low, high], [low, high], "k--", lw=1, label="predicted = measured")
    _label(ax, "measured latency (ms, median)", "predicted latency (ms)", "latency predictor vs measurement")
    return _png(fig)


def downstream_figure(run: dict) -> bytes | None:
    """Measured latency vs the fine-tuned score (mean over the run's tasks) of every exported model."""
    plt = _pyplot()
    points = [(m, m["latency"]["latency"]["median_ms"], _mean_score(m["finetune"])) for m in run["models"]
              if m["latency"] and m["finetune"] and m["finetune"].get("tasks")]
    if plt is None or not points:
        return None
    tasks = ", ".join(sorted(points[0][0]["finetune"]["tasks"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (m, ms, score) in enumerate(points):
        ax.scatter([ms], [score], marker="*", s=220, color=f"C{i}", edgecolor="black", zorder=3,
                   label=f"{m['target']}: {m['arch']}")
    ax.margins(0.2)  # a handful of points: keep the stars off the frame
    _label(ax, "measured latency (ms, median)", f"fine-tuned dev score (mean of {tasks})",
           "exported models: latency vs downstream score")
    return _png(fig)


def _mean_score(results: dict) -> float:
    scores = [record["score"] for record in results["tasks"].values()]
    return sum(scores) / len(scores)


def training_figure(run: dict) -> bytes | None:
    """Pre-training loss and the validation panel's MLM accuracy against the step."""
    plt, path = _pyplot(), run["metrics_csv"]
    if plt is None or path is None or not Path(path).is_file():
        return None
    train = _train_loss(Path(path))
    curves = read_validation_curves(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    if train:
        left.plot(*zip(*train), lw=1)
    for m in run["models"]:
        further = Path(m["further_run"]) / "metrics.csv" if m.get("further_run") else None
        if further is not None and further.is_file():
            points = _train_loss(further)
            if points:
                left.plot(*zip(*points), lw=1, label=f"further training {m['target']}")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("SuperPLM pre-training loss (random sub-model per step)")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    for arch, points in sorted(curves.items()):
        right.plot(*zip(*points), marker="o", markersize=3, label=arch)
    right.set_xlabel("step")
    right.set_ylabel("validation MLM accuracy")
    right.set_title("validation panel")
    right.grid(alpha=0.3)
    if curves:
        right.legend(fontsize=7)
    return _png(fig)


def _train_loss(metrics_csv: Path) -> list[tuple[int, float]]:
    with metrics_csv.open(newline="") as handle:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle) if r["split"] == "train" and r.get("loss")]


# --- tables -----------------------------------------------------------------------------------
def _space_rows(run: dict) -> list[list[str]]:
    space = (run["supernet_config"] or {}).get("space") or {}
    rows = []
    for name, value in space.items():
        if isinstance(value, dict):
            rows.append([name, f"{value.get('min')} .. {value.get('max')}" + (f" step {value['step']}" if value.get("step") else "")])
        else:
            rows.append([name, str(value)])
    return rows


def _model_table(run: dict) -> tuple[list[str], list[list[str]]]:
    header = ["target", "architecture", "params (M)", "GFLOPs", "form searched", "predicted ms", "measured ms", "error",
              "speedup vs BERT-base", "forms measured (ms)", "fp32 score", "int8 score", "ships as", "proxy fitness",
              "model"]
    reference = run.get("reference")
    if reference:
        header += ["speedup vs source", "params vs source", "score vs source"]
    rows = []
    for m in ([reference] if reference else []) + run["models"]:
        lat = m["latency"] or {}
        measured = lat.get("latency", {}).get("median_ms")
        predicted = lat.get("predicted_ms")
        bert_base = lat.get("reference_ms")
        forms = lat.get("forms") or {}
        rows.append([m["target"], m["arch"], _fmt(m["export"].get("parameters"), 1e-6, 2), _fmt(lat.get("flops"), 1e-9, 2),
                     lat.get("form", "-"), _fmt(predicted, 1, 2), _fmt(measured, 1, 2), _prediction_error(lat),
                     f"{bert_base / measured:.1f}x" if bert_base and measured else "-",
                     ", ".join(f"{name} {form['median_ms']:.2f}" for name, form in forms.items()) or "-",
                     *(_fmt(score, 1, 2) for score in _fp32_int8_scores(m)),
                     _shipped_form(m, run["config"]),
                     _fmt(m["search"].get("fitness"), 1, 4), str(m["final"])])
        if reference:
            rows[-1] += _versus(m, reference)
    return header, rows


# The int8 graph `finetune.int8_eval` scores (model.opt.int8.onnx); other int8 forms are not scored.
SCORED_INT8_FORM = "onnxruntime-opt-int8"


def _fp32_int8_scores(model: dict) -> tuple[float | None, float | None]:
    """A model row's mean dev score in fp32 and as its int8 ONNX Runtime graph (None: not scored)."""
    fp32 = _mean_score(model["finetune"]) if model["finetune"] and model["finetune"].get("tasks") else None
    return fp32, _mean_score(model["finetune_int8"]) if model.get("finetune_int8") else None


def _shipped_form(model: dict, config: dict) -> str:
    """The fastest measured form whose dev score is within finetune.form_tolerance of fp32 (`choose_form`)."""
    from .verify import choose_form

    forms = {name: form["median_ms"] for name, form in ((model["latency"] or {}).get("forms") or {}).items()}
    if not forms:
        return "-"
    fp32, int8 = _fp32_int8_scores(model)
    scores = {name: (int8 if name == SCORED_INT8_FORM else None) if "int8" in name else fp32 for name in forms}
    from .settings import FinetuneStage

    # A run recorded before the option existed: its declared default.
    tolerance = (config.get("finetune") or {}).get("form_tolerance", FinetuneStage().form_tolerance)
    choice = choose_form(forms, scores, tolerance)
    return f"{choice['form']} ({choice['reason']})" if choice["form"] else "-"


def _prediction_error(latency: dict) -> str:
    """Signed error of the predicted speed-up over the reference timed side by side (negative: the
    model measured slower than predicted); runs before that measurement: of the absolute times."""
    if "speedup_error_pct" in latency:
        return f"{latency['speedup_error_pct']:+.1f}% (speed-up)"
    predicted, measured = latency.get("predicted_ms"), latency.get("latency", {}).get("median_ms")
    return f"{100 * (predicted - measured) / measured:+.1f}%" if predicted and measured else "-"


def _speedup(model: dict, reference: dict) -> float | None:
    """The model's speed-up over the source: measured side by side in one run where it was, else the
    ratio of two separate medians (runs before that measurement)."""
    lat, ref_lat = model["latency"] or {}, reference["latency"] or {}
    if "speedup" in lat and lat.get("reference_arch") == reference["arch"]:
        return lat["speedup"]
    ms, ref_ms = lat.get("latency", {}).get("median_ms"), ref_lat.get("latency", {}).get("median_ms")
    return ref_ms / ms if ms and ref_ms else None


def _versus(model: dict, reference: dict) -> list[str]:
    """Speedup, parameter share and mean-score share of a model relative to the pre-trained source."""
    from .tasks.run import score_share

    speedup = _speedup(model, reference)
    params, ref_params = model["export"].get("parameters"), reference["export"].get("parameters")
    tasks, ref_tasks = ((model["finetune"] or {}).get("tasks"), (reference["finetune"] or {}).get("tasks"))
    share = score_share(tasks, ref_tasks) if tasks and ref_tasks else None
    return [f"{speedup:.2f}x" if speedup else "-",
            f"{100 * params / ref_params:.0f}%" if params and ref_params else "-",
            "-" if share is None else f"{share:.1f}%"]


def _fmt(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _cost_table(run: dict) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "status", "wall time", "CPU hours", "GPU hours", "attempts"]
    rows, totals = [], [0.0, 0.0, 0.0]
    for name, entry in run["stages"].items():
        if name == "report" and entry.get("status") != "done":
            continue  # this very stage, while it writes the page
        wall, cpu, gpu = entry.get("wall_seconds", 0.0), entry.get("cpu_hours", 0.0), entry.get("gpu_hours", 0.0)
        totals = [totals[0] + wall, totals[1] + cpu, totals[2] + gpu]
        rows.append([name, entry.get("status", "-"), _duration(wall), f"{cpu:.4f}", f"{gpu:.4f}", str(entry.get("attempts", 0))])
    rows.append(["**total**", "", _duration(totals[0]), f"{totals[1]:.4f}", f"{totals[2]:.4f}", ""])
    return header, rows


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _task_table(run: dict) -> str | None:
    from .tasks.run import results_table

    models = [m for m in run["models"] if m["finetune"] and m["finetune"].get("tasks")]
    if not models:
        return None
    int8 = [m for m in models if m.get("finetune_int8") and m["finetune_int8"].get("tasks")]
    runs = [m["finetune"] for m in models] + [m["finetune_int8"] for m in int8]
    names = ([f"{m['target']} {m['arch']}" for m in models]
             + [f"{m['target']} {m['arch']} (int8 ONNX Runtime)" for m in int8])
    reference = run.get("reference")
    if reference and reference["finetune"] and reference["finetune"].get("tasks"):
        return results_table(runs, names=names, reference=reference["finetune"],
                             reference_name=f"source {reference['arch']}")
    return results_table(runs, names=names)


def _fingerprint_line(latency: dict) -> str:
    fp = latency.get("fingerprint") or {}
    return (f"{fp.get('cpu_model', '?')} ({fp.get('logical_cpus', '?')} logical CPUs), {fp.get('engine', '?')} "
            f"{fp.get('engine_version', '')}, {fp.get('threads', '?')} thread(s), batch {fp.get('batch_size', '?')}, "
            f"sequence {fp.get('seq_len', '?')}, {fp.get('clock', 'wall')} clock, deployed form "
            f"{latency.get('form', fp.get('engine', '?'))}")


# --- markdown / HTML ---------------------------------------------------------------------------
def _sections(run: dict) -> list[tuple[str, str, str | None]]:
    """(title, markdown body, figure key) in page order."""
    config = run["config"]
    note = ""
    if (run["stages"].get("data") or {}).get("outputs", {}).get("builtin_task"):
        note = ("\n\nThe task column `SST-2` here is the built-in **VADER lexicon polarity** task (7,500 human-rated "
                "English words and phrases from the vaderSentiment package, positive vs negative), stored in the SST-2 "
                "layout; it is not the GLUE SST-2 data set.")
    targets = ", ".join(m["target"] for m in run["models"]) or "-"
    header, rows = _model_table(run)
    cost_header, cost_rows = _cost_table(run)
    task_table = _task_table(run)
    search = run["search"] or {}
    return [
        ("Search space", _md_table(["dimension", "range"], _space_rows(run)) +
         f"\n\nSuperPLM: `{run['supernet']}`; {_training_line(config)}.", None),
        ("Exported models", _md_table(header, rows) + f"\n\nTargets: {targets}. Latency measured on: "
         f"{_fingerprint_line(run['models'][0]['latency']) if run['models'] and run['models'][0]['latency'] else '-'}.", None),
        ("Pareto front: latency vs score",
         f"Method `{search.get('method', '-')}`, evaluator `{search.get('evaluator', '-')}`, "
         f"{search.get('evaluations', 0)} architectures evaluated.", "pareto"),
        ("Predicted vs measured latency", _latency_text(run), "latency"),
        ("Targets verified before shipping", _form_text(run.get("searched_form")) + _verify_text(run.get("verify")),
         None),
        ("Training curves", f"From `{run['metrics_csv']}`.", "training"),
        ("Downstream tasks", (task_table or "No fine-tuning in this run (finetune.tasks is empty).") + note,
         "downstream"),
        ("Cost of each stage", _md_table(cost_header, cost_rows) +
         "\n\nCPU hours count this process and its children (user + system time); GPU hours are wall time × GPUs used.",
         None),
    ]


def _form_text(form: dict | None) -> str:
    """The deployed form the search timed, and why (latency.form)."""
    if not form:
        return ""
    scores = form.get("scores") or {}
    evidence = ("; the teacher on the carved validation rows: " + ", ".join(f"{f} {v:.2f}" for f, v in scores.items())
                if scores else "")
    return f"Searched in form **{form['form']}**: {form['reason']}{evidence}.\n\n"


def _verify_text(verify: dict | None) -> str:
    """Each target's shortlist timed side by side with the reference, and what shipped."""
    from .verify import OVERSHOOT

    if not verify:
        return "Not verified (search.verify is 0, or the predictor was fitted on another device)."
    rows = []
    for target in verify["targets"]:
        for c in target["candidates"]:
            shipped = "**ships**" if c["arch"] == target["arch"] else ""
            rank = str(c["rank"] + 1) + (" (corrected search)" if c.get("corrected") else "")
            rows.append([target["target"], f"{target['target_speedup']:.2f}x", rank, c["arch"],
                         f"{c['fitness']:.4f}", f"{c['predicted_speedup']:.2f}x", f"{c['measured_speedup']:.2f}x",
                         f"{c['error_pct']:+.1f}%", "yes" if c["meets"] else "no", shipped])
    missed = [t for t in verify["targets"] if not t["met"]]
    note = "".join(f"\n\n**{t['target']}: no candidate met the target**; the fastest measured ships, "
                   f"{t['shortfall_pct']:.1f}% short of it." for t in missed)
    note += "".join(f"\n\n{t['target']}: `{t['correction']['shipped_before']}` measured outside the band (short of the "
                    f"target or more than {100 * OVERSHOOT:.0f}% faster), so the target was searched again for "
                    f"{t['correction']['searched_ms']:.3f} ms predicted (the predictor's measured / predicted ratio "
                    f"there: {t['correction']['calibration']:.3f}); the ships mark is the choice over both rounds."
                    for t in verify["targets"] if t.get("correction"))
    reference = verify["reference"]
    return (f"Each target's best candidates (each predicted faster than the better ones) and the reference "
            f"`{reference['arch']}` timed together in one interleaved run ({verify.get('form') or '-'}; load average "
            f"{verify.get('load_average')}); speed-ups are the median over rounds of the reference's time / the "
            "model's in the same round; the best whose measured speed-up meets the target (at most "
            f"{100 * OVERSHOOT:.0f}% beyond it, when one is) ships.\n\n"
            + _md_table(["target", "target speed-up", "rank", "architecture", "fitness", "predicted", "measured",
                         "error", "meets", ""], rows) + note)


def _latency_text(run: dict) -> str:
    fit = run["latency_fit"] or {}
    # The predictor in use is the one cross-validation chose ("selected"); older fits had the MLP only.
    chosen = fit.get("selected") or fit.get("mlp") or {}
    if not chosen:
        return "The latency predictor was reused; its held-out error is in its own file."
    kind = fit.get("chosen", "mlp")
    signed = chosen.get("signed_error_pct")
    return (f"Predictor ({kind}) held-out error on {fit.get('n_heldout')} profiled architectures: MAPE "
            f"{chosen.get('mape_pct', 0):.2f}%"
            + (f", mean signed error {signed:+.2f}% (negative: predicted faster than measured)" if signed is not None
               else "")
            + f", RMSE {chosen.get('rmse_ms', 0):.2f} ms, Spearman {chosen.get('spearman', 0):.3f}. The exported "
            "models' speed-ups over the reference, predicted vs measured side by side, are in the model table.")


def render_markdown(run: dict, title: str, figures: dict[str, str]) -> str:
    parts = [f"# {title}", "", f"Run directory: `{run['dir']}`", ""]
    for heading, body, figure in _sections(run):
        parts += [f"## {heading}", "", body, ""]
        if figure and figure in figures:
            parts += [f"![{heading}]({figures[figure]})", ""]
    return "\n".join(parts)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}")


def render_html(run: dict, title: str, images: dict[str, bytes]) -> str:
    import base64
    import html

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Run directory: <code>{html.escape(str(run['dir']))}</code></p>"]
    for heading, text, figure in _sections(run):
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(_markdown_to_html(text))
        if figure and images.get(figure):
            data = base64.b64encode(images[figure]).decode("ascii")
            body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">')
        elif figure and figure != "downstream":
            body.append("<p><em>(no plot: matplotlib is not installed or the data is missing)</em></p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _markdown_to_html(text: str) -> str:
    """The small markdown subset the sections use: pipe tables, paragraphs, `code`, **bold**."""
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]*)\*\*", r"<strong>\1</strong>", s)

    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if lines and all(line.startswith("|") for line in lines):
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-: ")]
            head, *rows = cells
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
        elif lines:
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(out)


# --- model cards ---------------------------------------------------------------------------------
def model_card(run: dict, model: dict, inherited_only: bool = False) -> str:
    """README.md for an exported checkpoint: what it is, how fast, how good, how it was made.

    ``inherited_only``: the card of the extracted checkpoint when a further-trained one exists
    (its weights are the SuperPLM's slice; the fine-tuned scores belong to the other one)."""
    export, lat, config = model["export"], model["latency"] or {}, run["config"]
    trained = bool(model.get("further_run")) and not inherited_only
    fields = export.get("arch_fields") or {}
    remote = export.get("model_type") == "autotinybert"
    measured = lat.get("latency", {}).get("median_ms")
    lines = [
        "---", "library_name: transformers", "tags: [autotinybert, bert, tiny-bert]", "---", "",
        f"# AutoTinyBERT {model['arch']} (target {model['target']})", "",
        "A BERT-style encoder whose shape was chosen by AutoTinyBERT (Yin et al., ACL 2021) to meet a latency "
        "budget, with weights inherited from a one-shot SuperPLM" +
        (" and then further trained." if trained else " (no further training)."), "",
        "## Architecture", "",
        _md_table(["field", "value"], [[k, str(v)] for k, v in fields.items()] +
                  [["model_type", str(export.get("model_type"))], ["parameters", f"{export.get('parameters', 0):,}"],
                   ["FLOPs (batch 1, seq 128)", f"{lat.get('flops', 0):,}"]]), "",
        "## Latency", "",
        f"Measured median {measured:.2f} ms (predicted {lat.get('predicted_ms', 0):.2f} ms)" if measured else "Not measured.",
        f"on {_fingerprint_line(lat)}." if measured else "", "",
        "## Scores", "", _card_scores(model, run, inherited_only), "",
        "## How it was produced", "",
        f"- SuperPLM `{run['supernet']}` ({_training_line(config)}"
        f"{'' if _task_route(config) else ', ' + str(config.get('pretrain', {}).get('max_steps')) + ' steps'}"
        f"{' — reused' if config.get('pretrain', {}).get('reuse') else ''}).",
        f"- Search `{(run['search'] or {}).get('method')}` with the `{(run['search'] or {}).get('evaluator')}` evaluator "
        f"for target {model['target']} ({model['search'].get('target_ms', 0):.2f} ms predicted budget).",
        f"- Extracted by slicing (first rows/columns of every matrix, first layers) into `{model['extracted']}`.",
        (f"- Trained on the task by KD from the fine-tuned source (the final recipe), checkpoint picked on "
         f"rows carved from train, in `{model['further_run']}`." if _task_route(config) and trained else
         f"- Further trained for {config.get('further_train', {}).get('max_steps')} steps "
         f"({config.get('further_train', {}).get('objective')}) in `{model['further_run']}`."
         if trained else f"- Not further trained here{'; the further-trained version is ' + chr(96) + str(model['final']) + chr(96) if inherited_only else ''}."),
        f"- Pipeline: `autotinybert develop` run in `{run['dir']}` (config in its manifest.json).", "",
        "## Use", "", "```python", f"from transformers import {_auto_class(config)}, AutoTokenizer",
        f"model = {_auto_class(config)}.from_pretrained(PATH{', trust_remote_code=True' if remote else ''})",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
    ]
    return "\n".join(lines)


def _card_scores(model: dict, run: dict, inherited_only: bool = False) -> str:
    rows = [["proxy fitness in the search", f"{model['search'].get('fitness', float('nan')):.4f}"]]
    if inherited_only:
        return _md_table(["score", "value"], rows) + (f"\n\nFine-tuned scores are those of the further-trained "
                                                       f"version, `{model['final']}`.")
    for task, record in ((model["finetune"] or {}).get("tasks") or {}).items():
        rows.append([f"{task} dev (fine-tuned)", f"{record['score']:.2f}"])
    builtin = (run["stages"].get("data") or {}).get("outputs", {}).get("builtin_task")
    note = "\n\n(sst2 here is the built-in VADER lexicon polarity task, not GLUE SST-2.)" if builtin else ""
    return _md_table(["score", "value"], rows) + note


def write_model_cards(run: dict) -> list[Path]:
    from .files import atomic_write_text

    written = []
    for model in run["models"]:
        cards = {model["final"]: model_card(run, model)}
        if model["extracted"] != model["final"]:
            cards[model["extracted"]] = model_card(run, model, inherited_only=True)
        for directory, card in cards.items():
            if Path(directory).is_dir():
                atomic_write_text(Path(directory) / "README.md", card)
                written.append(Path(directory) / "README.md")
    return written


def build_report(run_dir: str | Path, out: str | Path | None = None, title: str | None = None,
                 overwrite: bool = False) -> dict[str, Path]:
    """``out/index.html`` (self-contained: plots as base64 PNG), ``out/summary.md`` (+ PNG files),
    and a README.md model card in every exported checkpoint. Reads files only."""
    from .files import atomic_write_bytes, atomic_write_text, staged_directory

    run = load_run(run_dir)
    out = Path(out) if out else Path(run_dir) / "report"
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file() and not overwrite:
        raise UserError(f"--out {out} is not empty and holds no report; pass --overwrite to replace it or choose "
                        "another path")
    title = title or f"AutoTinyBERT run {Path(run_dir).absolute().name}"
    images = {name: figure(run) for name, figure in
              (("pareto", pareto_figure), ("latency", latency_figure), ("training", training_figure),
               ("downstream", downstream_figure))}
    figures = {name: f"{name}.png" for name, png in images.items() if png}
    markdown, html = render_markdown(run, title, figures), render_html(run, title, images)
    with staged_directory(out, overwrite=True) as tmp:  # a previous report is replaced whole, when done
        for name, png in images.items():
            if png:
                atomic_write_bytes(tmp / f"{name}.png", png)
        atomic_write_text(tmp / "summary.md", markdown)
        atomic_write_text(tmp / "index.html", html)
    cards = write_model_cards(run)
    return {"html": out / "index.html", "markdown": out / "summary.md", **{f"card{i}": p for i, p in enumerate(cards)}}


def _task_route(config: dict) -> bool:
    return bool((config.get("task") or {}).get("enabled"))


def _training_line(config: dict) -> str:
    """How the SuperPLM was trained, as the report states it."""
    if _task_route(config):
        return ("task route: the fine-tuned source made elastic and every sub-model trained on the task by KD from "
                "its logits")
    return f"objective `{config.get('pretrain', {}).get('objective', '-')}`"


def _auto_class(config: dict) -> str:
    """The transformers class that loads the run's models: task-route models carry their task head."""
    return "AutoModelForSequenceClassification" if _task_route(config) else "AutoModelForMaskedLM"
