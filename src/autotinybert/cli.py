"""The `autotinybert` command: argument parsing only; each stage's work lives in its module.

Every flag is derived from the option declarations in `settings` (see `options`): this module
only says which declarations each command takes, and prints results. User errors (`UserError`)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import threading
from typing import Any, Callable, Iterator

from . import settings as S
from .errors import Preempted, SetupWarning, Terminated, UserError, first_line
from .options import add_options, as_plain, from_namespace

# command -> (help, [(dataclass, add_options keyword arguments)], handler)
Part = tuple[type, dict[str, Any]]
_EVAL_OPTIONS = ("max_seq_length", "doc_stride", "eval_batch_size", "max_eval_examples", "null_score_threshold",
                 "progress")
_FINETUNE_TASK_DATA: list[Part] = [(S.TaskDataSettings, {"group": "finetune and task evaluators (finetune: each "
                                                                  "candidate fine-tuned in memory and scored)"}),
                                   (S.FinetuneBudget, {"prefix": "ft_", "group": "finetune evaluator budget"})]
_EVALUATOR_PARTS: list[Part] = [(S.ProxySettings, {}), (S.ProxyDataCommand, {}), *_FINETUNE_TASK_DATA,
                                (S.TaskEvaluatorSettings, {"group": "task evaluator (a task SuperPLM's inherited score "
                                                                    "on rows carved from train)"})]


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument as used, for the stage's config.yaml."""
    return {k: as_plain(v) for k, v in vars(args).items() if k != "handler"}


def _quiet_transformers() -> None:
    """transformers' per-file progress bars drown our own output on every load/save."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# --- space / init / extract ------------------------------------------------------------------------
def _run_space(args: argparse.Namespace) -> int:
    from .space import SearchSpace, parameter_count, released

    o = from_namespace(S.SpaceCommand, args)
    space = SearchSpace.load(o.space) if o.space else SearchSpace.paper(o.mode)
    print(space.describe())
    print()
    print(f"{'released':<8} {'architecture':<24} {'in space':<9} {'speedup':>7} {'params (M)':>11} {'w/o emb. (M)':>13}")
    for item in released(space.mode):
        total = parameter_count(item.arch, o.vocab_size)
        encoder = parameter_count(item.arch, vocab_size=0, max_position_embeddings=0, type_vocab_size=0) \
            - 2 * item.arch.hidden_size
        print(f"{item.name:<8} {str(item.arch):<24} {'yes' if space.contains(item.arch) else 'NO':<9} "
              f"{item.speedup:>6.1f}x {total / 1e6:>11.1f} {encoder / 1e6:>13.1f}")
    return 0


def _run_init(args: argparse.Namespace) -> int:
    from .checkpoint import init_supernet_checkpoint

    o = from_namespace(S.InitSettings, args)
    _quiet_transformers()
    if o.source is not None:
        from .pretrained import init_from_source

        summary = init_from_source(o, _arguments(args))
        diff = max(summary["max_abs_diff"].values())
        print(f"SuperPLM from {o.source} ({summary['mode']} space, largest {summary['largest']} = the source to "
              f"{diff:.1e}, importance {summary['importance']}, MLM head {summary['mlm_head']}) written to {o.out}")
        return 0
    summary = init_supernet_checkpoint(
        space=o.space, out_dir=o.out, tokenizer_dir=o.tokenizer, vocab_size=o.vocab_size,
        teacher_hidden_size=o.teacher_hidden_size, seed=o.seed, overwrite=o.overwrite, arguments=_arguments(args))
    print(f"SuperPLM ({summary['mode']} space, largest {summary['largest']}, vocab {summary['vocab_size']}, "
          f"{summary['parameters'] / 1e6:.1f}M parameters) written to {o.out}")
    return 0


def _run_extract(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    o = from_namespace(S.ExtractSettings, args)
    _quiet_transformers()
    summary = export_checkpoint(supernet_dir=o.supernet, arch=o.arch, out_dir=o.out, encoder_only=o.encoder_only,
                                onnx=o.onnx, onnx_optimize=o.onnx_optimize, onnx_int8=o.onnx_int8, verify=o.verify,
                                overwrite=o.overwrite, arguments=_arguments(args))
    print(f"exported {summary['arch']} ({summary['model_type']}, {summary['parameters'] / 1e6:.2f}M parameters) to {o.out}")
    if "max_abs_diff" in summary:
        worst = max(summary["max_abs_diff"].values())
        print(f"verified: max |difference| vs the sliced SuperPLM = {worst:.2e} ({', '.join(summary['max_abs_diff'])})")
    for form, info in summary.get("onnx_forms", {}).items():
        print(f"  {info['file']:<20} {', '.join(f'{op} {n}' for op, n in info['operators'].items())}")
    for engine, agreement in summary.get("int8_agreement", {}).items():
        print(f"int8 ({engine}) vs fp32: mean |difference| {100 * agreement['relative_mean_diff']:.2f}% of mean |output|, "
              f"arg-max agreement {100 * agreement['argmax_agreement']:.1f}%")
    return 0


# --- pretrain -----------------------------------------------------------------------------------
def _run_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    settings = from_namespace(S.PretrainSettings, args)
    _quiet_transformers()
    command = from_namespace(S.PretrainCommand, args)
    summary = pretrain(settings, resume=command.resume, overwrite=command.overwrite)
    if summary.get("validation"):
        print(f"{'architecture':<26} {'MLM loss':>9} {'MLM acc':>8}" + (f" {'KD loss':>8}" if settings.objective != "mlm" else ""))
        for arch, row in summary["validation"].items():
            kd = f" {row['kd_loss']:>8.4f}" if "kd_loss" in row else ""
            print(f"{arch:<26} {row['mlm_loss']:>9.3f} {row['mlm_accuracy']:>8.3f}{kd}")
    print(f"{summary['steps']} steps, {summary['tokens_per_second']:,} tokens/s; SuperPLM in {settings.out}")
    return 0


# --- latency ------------------------------------------------------------------------------------
def _run_latency_profile(args: argparse.Namespace) -> int:
    from .latency import profile

    o, settings = from_namespace(S.ProfileCommand, args), from_namespace(S.LatencySettings, args)
    plan = from_namespace(S.ProfileSettings, args)
    records = profile(o.space, plan.samples, o.out, settings, seed=o.seed, resume=o.resume, overwrite=o.overwrite,
                      progress=o.progress, arguments=_arguments(args), drift_anchor=plan.drift_anchor)
    reference = statistics.median(r["latency"]["median_ms"] for r in records if r["reference"])
    print(f"{len(records)} measurements ({settings.form}, {settings.threads} thread(s), batch {settings.batch_size}, "
          f"seq {settings.seq_len}, {settings.clock} clock) in {o.out}; BERT-base median {reference:.1f} ms")
    paced = [r["paced"]["noise"] for r in records if r.get("paced")]
    print(f"noise (IQR / median, median over models): {100 * statistics.median(r['latency']['noise'] for r in records):.1f}% "
          "as timed" + (f", {100 * statistics.median(paced):.1f}% divided by the drift anchor's round by round" if paced else ""))
    return 0


def _run_latency_bundle(args: argparse.Namespace) -> int:
    from .latency.bundle import RUNNER_FILE, write_bundle

    o = from_namespace(S.BundleCommand, args)
    settings = from_namespace(S.LatencySettings, args, engine="onnxruntime", vocab_size=o.vocab_size)
    plan = write_bundle(o.space, from_namespace(S.ProfileSettings, args).samples, o.out, settings, seed=o.seed,
                        reference=o.reference, overwrite=o.overwrite, progress=o.progress, arguments=_arguments(args))
    print(f"{len(plan['models'])} ONNX models ({plan['form']}) in {o.out}; on the device: python {RUNNER_FILE} "
          f"--out profile.jsonl (needs onnxruntime and numpy), then: autotinybert latency fit --data profile.jsonl")
    return 0


def _run_latency_fit(args: argparse.Namespace) -> int:
    from .latency import fit, write_output_config
    from .latency.hardware import shape_of

    o, f = from_namespace(S.FitCommand, args), from_namespace(S.FitSettings, args)
    if o.out.exists() and not o.overwrite:
        raise UserError(f"--out {o.out} already exists; pass --overwrite to replace it or choose another path")
    predictor, report = fit(o.data, holdout=f.holdout, seed=o.seed, hidden=f.hidden, epochs=f.epochs, folds=f.folds)
    predictor.save(o.out)
    write_output_config(o.out, _arguments(args))
    print(f"fitted on {report['n_train']} architectures ({predictor.fingerprint.get('engine')}, form "
          f"{S.LatencySettings(**shape_of(predictor.fingerprint)).form}), held out {report['n_heldout']}; "
          f"chosen by {report['folds']}-fold cross-validation: {report['chosen']}")
    print(f"  {'predictor':<10} {'CV MAPE':>8} {'held-out MAPE':>14} {'signed':>8} {'RMSE':>9} {'Spearman':>9}")
    for kind, name in (("mlp", "mlp"), ("costs", "costs"), ("flops", "baseline")):
        m, cv = report[name], report["cross_validation"][kind]
        mark = "  <- chosen" if kind == report["chosen"] else ""
        label = "flops" if kind == "flops" else kind
        print(f"  {label:<10} {cv['mape_pct']:>7.2f}% {m['mape_pct']:>13.2f}% {m['signed_error_pct']:>+7.2f}% "
              f"{m['rmse_ms']:>6.2f} ms {m['spearman']:>9.4f}{mark}")
    if predictor.reference_ms is not None:
        print(f"BERT-base reference {predictor.reference_ms:.1f} ms; predictor written to {o.out}")
    return 0


def _run_latency_predict(args: argparse.Namespace) -> int:
    from .latency import LatencyPredictor
    from .space import Arch, SearchSpace

    o = from_namespace(S.PredictCommand, args)
    predictor = LatencyPredictor.load(o.predictor, space=SearchSpace.load(o.space) if o.space else None)
    for text in o.archs:
        arch = Arch.parse(text)
        ms = predictor.predict(arch)
        speedup = f"  ({predictor.reference_ms / ms:.1f}x faster than BERT-base)" if predictor.reference_ms else ""
        outside = "" if predictor.covers(arch) else "  [outside the profiled space: extrapolated]"
        print(f"{arch}  {ms:.2f} ms{speedup}{outside}")
    return 0


def _run_latency_check(args: argparse.Namespace) -> int:
    from .latency import check

    o, timing = from_namespace(S.PredictCommand, args), from_namespace(S.LatencySettings, args)
    rows = check(o.predictor, o.archs, warmup=timing.warmup, repeats=timing.repeats,
                 timing={k: getattr(timing, k) for k in _ROBUST[2:]})
    print(f"{'architecture':<24} {'predicted':>10} {'measured':>10} {'error':>8} {'noise':>6}")
    for row in rows:
        print(f"{row['arch']:<24} {row['predicted_ms']:>8.2f}ms {row['measured_ms']:>8.2f}ms {row['error_pct']:>+7.1f}% "
              f"{100 * row['noise']:>5.1f}%")
    return 0


def _run_latency_compare(args: argparse.Namespace) -> int:
    from .files import atomic_write_json
    from .latency.compare import compare_models, compare_table

    o, settings = from_namespace(S.CompareCommand, args), from_namespace(S.LatencySettings, args)
    if o.out is not None and o.out.exists() and not o.overwrite:
        raise UserError(f"--out {o.out} already exists; pass --overwrite to replace it or choose another path")
    _quiet_transformers()
    result = compare_models(o.models, o.reference, settings, rounds=o.rounds, trust_remote_code=o.trust_remote_code)
    print(compare_table(result))
    if o.out is not None:
        atomic_write_json(o.out, {**result, "arguments": _arguments(args)})
        print(f"results in {o.out}")
    return 0


# --- search -------------------------------------------------------------------------------------
def _search_job(args: argparse.Namespace, **fixed: Any):
    from .search_stage import SearchJob

    return SearchJob(
        command=from_namespace(S.SearchCommand, args, **fixed), targets=from_namespace(S.TargetSettings, args),
        search=from_namespace(S.SearchSettings, args), proxy=from_namespace(S.ProxySettings, args),
        proxy_data=from_namespace(S.ProxyDataCommand, args), tasks=from_namespace(S.TaskDataSettings, args),
        budget=from_namespace(S.FinetuneBudget, args, prefix="ft_"),
        task_eval=from_namespace(S.TaskEvaluatorSettings, args))


def _run_search(args: argparse.Namespace) -> int:
    from .search_stage import run_search_stage

    job = _search_job(args)
    _quiet_transformers()
    summary = run_search_stage(job, arguments=_arguments(args))
    print(f"{'target':<10} {'window (ms)':<17} {'candidates':>10} {'best architecture':<24} {'latency':>9} {'fitness':>8}")
    for row in summary["targets"]:
        low, high = row["window_ms"]
        best = row["best"]
        print(f"{row['target']['name']:<10} {f'{low:.2f}..{high:.2f}':<17} {row['candidates']:>10} {best['arch']:<24} "
              f"{best['latency_ms']:>7.2f}ms {best['fitness']:>8.4f}")
    print(f"{summary['new_evaluations']} new evaluations ({summary['evaluations']} in total); results in {job.command.out}")
    return 0


def _run_search_correlate(args: argparse.Namespace) -> int:
    from .search_stage import run_correlate

    job, correlate = _search_job(args, evaluator="finetune"), from_namespace(S.CorrelateCommand, args)
    _quiet_transformers()
    summary = run_correlate(job, correlate.samples, correlate.fitness, arguments=_arguments(args))
    names = list(summary["fitness"])
    print(f"{'architecture':<24} {'latency':>9} " + " ".join(f"{n:>8}" for n in names) + f" {'finetune':>9}")
    for row in summary["rows"]:
        ms = f"{row['latency_ms']:.2f}ms" if row["latency_ms"] is not None else "-"
        print(f"{row['arch']:<24} {ms:>9} " + " ".join(f"{row[n]:>8.4f}" for n in names) + f" {row['finetune']:>9.2f}")

    def shown(result: dict, name: str) -> str:
        value, p_value = result[name], result[f"{name}_p"]
        return "undefined (a constant fitness)" if value is None else f"{value:+.3f} (p {p_value:.3f})"

    for name, result in summary["fitness"].items():
        print(f"{name}: Spearman {shown(result, 'spearman')}, Kendall {shown(result, 'kendall')}, top-1 regret "
              f"{result['top1_regret']:.2f} (picks {result['pick']}) over {summary['samples']} architectures")
    print(f"results in {job.command.out / 'correlate.json'}")
    return 0


# --- finetune / evaluate ------------------------------------------------------------------------
def _run_finetune(args: argparse.Namespace) -> int:
    from .tasks.run import results_table, run_finetune

    o, data = from_namespace(S.FinetuneCommand, args), from_namespace(S.TaskDataSettings, args)
    settings = from_namespace(S.FinetuneSettings, args)
    _quiet_transformers()
    _set_threads(o.threads)
    results = run_finetune(o, data, settings, arguments=_arguments(args))
    print(results_table([results]))
    print(f"results in {o.out / 'results.json'}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .tasks.run import results_table, run_evaluate

    o, data = from_namespace(S.EvaluateCommand, args), from_namespace(S.TaskDataSettings, args)
    if o.table:
        if o.model or data.tasks:
            raise UserError("--table only reads results; drop --model / --task")
        print(results_table(o.table, reference=o.reference))
        return 0
    if o.reference:
        raise UserError("--reference goes with --table RUN ...")
    if o.model is None:
        raise UserError("evaluate needs --model DIR (or --table RUN ... to tabulate results)")
    settings = from_namespace(S.FinetuneSettings, args)
    _quiet_transformers()
    _set_threads(o.threads)
    results = run_evaluate(o, data, settings, arguments=_arguments(args))
    print(results_table([results]))
    return 0


# --- develop / demo / report --------------------------------------------------------------------
def _develop(config_name: str, o: Any) -> int:
    import time

    from .develop import develop, final_models, load_config, remove_run

    config = load_config(config_name, o.set)
    _quiet_transformers()
    if o.overwrite:
        remove_run(o.out)
    started = time.perf_counter()
    manifest = develop(config, o.out)
    report = manifest["stages"]["report"]["outputs"]
    print(f"\ndone in {time.perf_counter() - started:.0f} s (all attempts: "
          f"{sum(e.get('wall_seconds', 0) for e in manifest['stages'].values()):.0f} s)")
    print(f"report:          {report['html']}\n                 {report['markdown']}")
    for target, path in final_models(manifest).items():
        print(f"model {target:>9}: {path}")
    auto = "AutoModelForSequenceClassification" if config["task"]["enabled"] else "AutoModelForMaskedLM"
    print(f"load a model with transformers.{auto}.from_pretrained(path, trust_remote_code=True)")
    return 0


def _run_develop(args: argparse.Namespace) -> int:
    o = from_namespace(S.DevelopCommand, args)
    if o.print_config:
        from .develop.config import load_config, render_config

        if o.set and not o.config:
            raise UserError("--set changes a config: give --config NAME too (without it --print-config prints the "
                            "declared defaults)")
        # Printing runs nothing: the data paths a config names are checked when it runs (paper-* name /data/...).
        config = load_config(o.config, o.set, check_paths=False) if o.config else None
        print(render_config(config, o.config), end="")
        return 0
    if not o.config or not o.out:
        raise UserError("develop needs --config (demo, task, cpu-small, from-pretrained, paper-mlm, paper-kd or a "
                        "YAML file) and --out DIR; --print-config prints a configuration instead")
    return _develop(o.config, o)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CONFIG

    return _develop(DEMO_CONFIG, from_namespace(S.DemoCommand, args))


def _run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    o = from_namespace(S.ReportCommand, args)
    paths = build_report(o.run_dir, o.out, title=o.title, overwrite=o.overwrite)
    cards = [p for k, p in paths.items() if k.startswith("card")]
    print(f"report: {paths['html']}\n        {paths['markdown']}\nmodel cards: {len(cards)} (README.md in each exported model)")
    return 0


# --- the parser ---------------------------------------------------------------------------------
_ROBUST = ("warmup", "repeats", "tolerance", "max_repeats", "noise_limit", "interleave")
_TIMING = ("engine", "optimize", "quantize", "threads", "batch_size", "seq_len", "clock", *_ROBUST)
_COMPARE_TIMING = ("batch_size", "seq_len", "threads", "warmup", "clock")  # the form: each file's own
COMMANDS: dict[str, tuple[str, list[Part], Callable[[argparse.Namespace], int]]] = {
    "demo": ("the task route on the built-in 'task' config: all-MiniLM-L6-v2 made 3x faster on a built-in task, "
             "no data files, offline, ~7 min on 2 CPUs",
             [(S.DemoCommand, {})], _run_demo),
    "space": ("print a search space, its size and the released architectures", [(S.SpaceCommand, {})], _run_space),
    "init": ("create a SuperPLM checkpoint: randomly initialised for a space, or from a pre-trained BERT (--from)",
             [(S.InitSettings, {})], _run_init),
    "extract": ("export one architecture of a SuperPLM as a Hugging Face checkpoint", [(S.ExtractSettings, {})],
                _run_extract),
    "pretrain": ("one-shot SuperPLM pre-training, or further training of one --arch",
                 [(S.PretrainSettings, {}), (S.PretrainCommand, {})], _run_pretrain),
    "finetune": ("fine-tune a model on GLUE / SQuAD tasks, keeping the best dev checkpoint",
                 [(S.FinetuneCommand, {}), (S.TaskDataSettings, {}), (S.FinetuneSettings, {})], _run_finetune),
    "evaluate": ("score fine-tuned models on GLUE / SQuAD dev sets, or tabulate results",
                 [(S.EvaluateCommand, {}), (S.TaskDataSettings, {"exclude": ("train_file",)}),
                  (S.FinetuneSettings, {"include": _EVAL_OPTIONS})], _run_evaluate),
    "develop": ("the efficient development pipeline: pretrain, latency, search, extract, further-train, fine-tune, "
                "report (resumable)", [(S.DevelopCommand, {})], _run_develop),
    "report": ("HTML + markdown report and model cards of a develop / demo run", [(S.ReportCommand, {})], _run_report),
}
LATENCY_COMMANDS: dict[str, tuple[str, list[Part], Callable[[argparse.Namespace], int]]] = {
    "profile": ("measure architectures spread over a space, plus BERT-base (JSONL)",
                [(S.ProfileCommand, {}), (S.ProfileSettings, {}), (S.LatencySettings, {"include": _TIMING})],
                _run_latency_profile),
    "bundle": ("write the ONNX models of a profile plan and a standalone runner for a device that cannot run "
               "autotinybert", [(S.BundleCommand, {}), (S.ProfileSettings, {"include": ("samples",)}),
                                (S.LatencySettings, {"include": _TIMING[1:]})], _run_latency_bundle),
    "fit": ("fit the latency predictors (MLP, costs, FLOPs) on profiled data and keep the one cross-validation picks",
            [(S.FitCommand, {}), (S.FitSettings, {})], _run_latency_fit),
    "predict": ("predicted latency of architectures", [(S.PredictCommand, {})], _run_latency_predict),
    "check": ("measure architectures now and compare with the predictor",
              [(S.PredictCommand, {"exclude": ("space",)}), (S.LatencySettings, {"include": _ROBUST})],
              _run_latency_check),
    "compare": ("time shipped models (checkpoint folders, .onnx files) against a reference as a user would: fixed "
                "inputs, a plain loop of shuffled rounds, speed-up = median of per-round reference / model",
                [(S.CompareCommand, {}), (S.LatencySettings, {"include": _COMPARE_TIMING})], _run_latency_compare),
}
_SEARCH_PARTS: list[Part] = [(S.SearchCommand, {}), (S.TargetSettings, {}), (S.SearchSettings, {}), *_EVALUATOR_PARTS]
_CORRELATE_PARTS: list[Part] = [
    (S.SearchCommand, {"exclude": ("evaluator", "plot")}), (S.CorrelateCommand, {}),
    (S.SearchSettings, {"include": ("window", "seed")}), (S.TargetSettings, {}), *_EVALUATOR_PARTS]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (the house style), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _add_command(sub: argparse._SubParsersAction, name: str, help_text: str, parts: list[Part],
                 handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    for cls, kwargs in parts:
        add_options(parser, cls, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="autotinybert", description="Find and build the best tiny BERT for a latency budget on "
                                                      "your device.")
    parser.add_argument("--version", action="version", version=f"autotinybert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, (help_text, parts, handler) in COMMANDS.items():
        _add_command(sub, name, help_text, parts, handler)
    latency = sub.add_parser("latency", help="measure latency, fit and use the latency predictor")
    stages = latency.add_subparsers(dest="latency_command", metavar="STAGE", required=True, parser_class=_Parser)
    for name, (help_text, parts, handler) in LATENCY_COMMANDS.items():
        _add_command(stages, name, help_text, parts, handler)
    search = _add_command(sub, "search", "search architectures of a SuperPLM under latency targets", _SEARCH_PARTS,
                          _run_search)
    correlate = search.add_subparsers(dest="search_command", metavar="STAGE", parser_class=_Parser)
    _add_command(correlate, "correlate", "Spearman correlation of proxy vs fine-tuned fitness on sampled "
                                         "architectures", _CORRELATE_PARTS, _run_search_correlate)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``autotinybert latency fit``: the words the user typed to pick the command."""
    words = [args.command, getattr(args, "latency_command", None), getattr(args, "search_command", None)]
    return " ".join(["autotinybert", *(w for w in words if w)])


def _one_line_warnings(name: str) -> Callable[..., None]:
    """Show warnings meant for people (`SetupWarning`) as one line, without a source path."""
    import warnings

    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SetupWarning):
            print(f"{name}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)
    return show


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[dict[str, bool]]:
    """Within the block, SIGTERM raises `Terminated` (the training loops' `StopOnSigterm` takes
    over inside their steps); the previous handler comes back after. Yields ``{"received": bool}``:
    an exception raised in the middle of a library's import can come out as another error (a module
    left half-initialised), so the caller tells a SIGTERM by the flag, not by the exception's type.

    Only in the process that installed it: a child forked meanwhile (which inherits the handler)
    dies of SIGTERM as it would have. Outside the main thread (no signal handlers there) it does nothing.
    """
    state = {"received": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    owner = os.getpid()

    def handle(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        state["received"] = True
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM at any moment, from before the arguments are read: one line and exit 143, never a
    # silent death (the writes are staged).
    with _sigterm_raises() as sigterm:
        try:
            args = build_parser().parse_args(argv)
        except Terminated as err:
            print("autotinybert: stopped by SIGTERM before the command began; nothing was written; rerun the same "
                  "command (--resume, where the command has it, starts it afresh)", file=sys.stderr)
            return err.exit_code
        try:
            return _run(args)
        except Exception:
            if not sigterm["received"]:
                raise
            # SIGTERM landed inside a library (e.g. mid-import) and came out as another error.
            print(f"{_command_name(args)}: stopped by SIGTERM; {_how_to_continue(args)}", file=sys.stderr)
            return Terminated.exit_code


def _run(args: argparse.Namespace) -> int:
    """The command's handler, each way it can end as one line and its exit code."""
    import warnings

    name = _command_name(args)
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning afterwards
            warnings.showwarning = _one_line_warnings(name)
            return int(args.handler(args) or 0)
    except Preempted as err:  # SIGTERM: a checkpoint was saved at a step boundary
        message = str(err) if args.command not in ("develop", "demo") else (
            f"stopped by SIGTERM during {err.command} at step {err.step}; checkpoint saved; rerun the same command "
            "to continue")
        print(f"{name}: {message}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"{name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        # A file system refusal naming a path (disk full, permissions, a file where a folder must
        # be): the user's to fix, not a bug, and no traceback helps.
        if err.filename is None:
            raise
        print(f"{name}: error: {err.strerror or first_line(err)}: {err.filename}; check the path and its "
              "permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; {_how_to_continue(args)}", file=sys.stderr)
        return 130
    except Terminated as err:  # SIGTERM outside a training step: nothing the rerun cannot redo
        print(f"{name}: stopped by SIGTERM; {_how_to_continue(args)}", file=sys.stderr)
        return err.exit_code


def _how_to_continue(args: argparse.Namespace) -> str:
    """Advice that the next command will honour (a stage with --resume refuses a plain rerun)."""
    if args.command in ("develop", "demo") or getattr(args, "resume", False):
        return "rerun the same command to continue where it stopped"
    if hasattr(args, "resume"):
        return "rerun the same command with --resume to continue where it stopped"
    return "rerun the same command to start again"


if __name__ == "__main__":
    sys.exit(main())
