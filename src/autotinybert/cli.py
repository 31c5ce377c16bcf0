"""The `autotinybert` command: argument parsing only; each stage's work lives in its module.

User errors (`UserError`) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError

# Stages that later issues build; each says so clearly instead of failing obscurely.
_NOT_BUILT: dict[str, str] = {}


def _add_space(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("space", help="print a search space, its size and the released architectures")
    p.add_argument("--mode", choices=["mlm", "kd"], default="mlm", help="paper space to show (default mlm)")
    p.add_argument("--space", help="a YAML/JSON space file instead of the paper space")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary for parameter counts (default 30522)")
    p.set_defaults(handler=_run_space)


def _run_space(args: argparse.Namespace) -> int:
    from .space import SearchSpace, parameter_count, released

    space = SearchSpace.load(args.space) if args.space else SearchSpace.paper(args.mode)
    print(space.describe())
    print()
    print(f"{'released':<8} {'architecture':<24} {'in space':<9} {'speedup':>7} {'params (M)':>11} {'w/o emb. (M)':>13}")
    for item in released(space.mode):
        total = parameter_count(item.arch, args.vocab_size)
        no_embeddings = _encoder_params(item.arch)
        print(f"{item.name:<8} {str(item.arch):<24} {'yes' if space.contains(item.arch) else 'NO':<9} "
              f"{item.speedup:>6.1f}x {total / 1e6:>11.1f} {no_embeddings / 1e6:>13.1f}")
    return 0


def _encoder_params(arch) -> int:
    from .space import parameter_count

    return parameter_count(arch, vocab_size=0, max_position_embeddings=0, type_vocab_size=0) - 2 * arch.hidden_size


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="export one architecture of a SuperPLM as a Hugging Face checkpoint")
    p.add_argument("--supernet", required=True, type=Path, help="SuperPLM checkpoint directory")
    p.add_argument("--arch", required=True, help="architecture, e.g. L5-H564-F1054-A8-Q512")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--encoder-only", action="store_true", help="export the bare encoder (BertModel) without the MLM head")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the [onnx] extra)")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check of the exported files")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(handler=_run_extract)


def _quiet_transformers() -> None:
    """transformers' per-file progress bars drown our own output on every load/save."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _run_extract(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    _quiet_transformers()
    summary = export_checkpoint(
        supernet_dir=args.supernet,
        arch=args.arch,
        out_dir=args.out,
        encoder_only=args.encoder_only,
        onnx=args.onnx,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        arguments=vars(args),
    )
    print(f"exported {summary['arch']} ({summary['model_type']}, {summary['parameters'] / 1e6:.2f}M parameters) to {args.out}")
    if "max_abs_diff" in summary:
        worst = max(summary["max_abs_diff"].values())
        print(f"verified: max |difference| vs the sliced SuperPLM = {worst:.2e} ({', '.join(summary['max_abs_diff'])})")
    return 0


def _add_task_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad, squad_v2 (repeat for several)")
    p.add_argument("--data-dir", type=Path,
                   help="glue_data/ (with <TASK>/train.tsv, dev.tsv) or its parent; for SQuAD, the folder of the JSON files")
    p.add_argument("--hub", action="store_true", help="read the data from the Hugging Face hub instead (needs [hub] and internet)")
    p.add_argument("--dev-file", type=Path, help="SQuAD dev JSON file (overrides --data-dir)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    p.add_argument("--max-seq-length", type=int, help="tokens per input (default 128 for GLUE, 384 for SQuAD)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD: token overlap between context windows (default 128)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--max-eval-examples", type=int, help="score a seeded random subset of each dev set")
    p.add_argument("--null-score-threshold", type=float, default=0.0,
                   help="SQuAD v2.0: answer only when best span score + threshold >= null score (default 0)")
    p.add_argument("--no-test-predictions", action="store_true",
                   help="skip the GLUE submission files for test sets (saves time on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is fastest on a busy machine)")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on GLUE / SQuAD tasks, keeping the best dev checkpoint")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory (e.g. from extract)")
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    _add_task_data_options(p)
    p.add_argument("--train-file", type=Path, help="SQuAD training JSON file (overrides --data-dir)")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--max-steps", type=int, help="training steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warm-up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--seed", type=int, default=42, help="seed of the head init, shuffling and dropout (default 42)")
    p.add_argument("--max-train-examples", type=int, help="train on a seeded random subset (budgets)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch inputs of similar length together (less padding: faster on a CPU)")
    p.add_argument("--eval-every", type=int, help="also evaluate every N steps (default: at each epoch end)")
    p.add_argument("--teacher", type=Path, help="a model fine-tuned on the task (or a finetune run) to distil logits from")
    p.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the teacher's soft targets (default 0.5)")
    p.add_argument("--kd-temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(handler=_run_finetune)


def _finetune_settings(args: argparse.Namespace):
    from .tasks.finetune import FinetuneSettings

    training = {}
    if args.command == "finetune":
        training = dict(epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr, batch_size=args.batch_size,
                        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
                        max_train_examples=args.max_train_examples, eval_every=args.eval_every,
                        group_by_length=args.group_by_length,
                        kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature)
    return FinetuneSettings(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                            eval_batch_size=args.eval_batch_size, max_eval_examples=args.max_eval_examples,
                            null_score_threshold=args.null_score_threshold, progress=not args.no_progress, **training)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _run_finetune(args: argparse.Namespace) -> int:
    from .tasks.run import results_table, run_finetune

    _quiet_transformers()
    _set_threads(args.threads)
    results = run_finetune(model=args.model, tasks=args.task, out=args.out, settings=_finetune_settings(args),
                           data_dir=args.data_dir, hub=args.hub, tokenizer=args.tokenizer, train_file=args.train_file,
                           dev_file=args.dev_file, teacher=args.teacher, test=not args.no_test_predictions, resume=args.resume,
                           overwrite=args.overwrite, arguments=vars(args))
    print(results_table([results]))
    print(f"results in {args.out / 'results.json'}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score fine-tuned models on GLUE / SQuAD dev sets, or tabulate results")
    p.add_argument("--model", type=Path, help="a fine-tuned model directory, or a finetune --out run")
    p.add_argument("--out", type=Path, help="write results.json, config.yaml and predictions here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--table", nargs="+", type=Path, metavar="RUN",
                   help="instead: print a markdown table of these finetune/evaluate runs' results.json")
    _add_task_data_options(p)
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .tasks.run import results_table, run_evaluate

    if args.table:
        if args.model or args.task:
            raise UserError("--table only reads results; drop --model / --task")
        print(results_table(args.table))
        return 0
    if args.model is None:
        raise UserError("evaluate needs --model DIR (or --table RUN ... to tabulate results)")
    _quiet_transformers()
    _set_threads(args.threads)
    results = run_evaluate(model=args.model, tasks=args.task, settings=_finetune_settings(args), data_dir=args.data_dir,
                           hub=args.hub, tokenizer=args.tokenizer, dev_file=args.dev_file, out=args.out,
                           test=not args.no_test_predictions,
                           overwrite=args.overwrite, arguments=vars(args))
    print(results_table([results]))
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a randomly initialised SuperPLM checkpoint for a space")
    p.add_argument("--space", default="paper-mlm", help="paper-mlm, paper-kd or a YAML/JSON file (default paper-mlm)")
    p.add_argument("--tokenizer", type=Path, help="a tokenizer/checkpoint directory whose vocabulary to use")
    p.add_argument("--vocab-size", type=int, help="vocabulary size when no --tokenizer is given")
    p.add_argument("--teacher-hidden-size", type=int, help="add a KD fit layer to this teacher width")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(handler=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    from .checkpoint import init_supernet_checkpoint

    _quiet_transformers()
    summary = init_supernet_checkpoint(
        space=args.space, out_dir=args.out, tokenizer_dir=args.tokenizer, vocab_size=args.vocab_size,
        teacher_hidden_size=args.teacher_hidden_size, seed=args.seed, overwrite=args.overwrite,
        arguments=vars(args),
    )
    print(f"SuperPLM ({summary['mode']} space, largest {summary['largest']}, vocab {summary['vocab_size']}, "
          f"{summary['parameters'] / 1e6:.1f}M parameters) written to {args.out}")
    return 0

def _add_latency(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="measure latency, fit and use the latency predictor")
    stages = p.add_subparsers(dest="latency_command", metavar="STAGE", required=True)

    def timing_options(q: argparse.ArgumentParser) -> None:
        # --engine is checked by LatencySettings (not argparse choices) so a typo is one clear line.
        q.add_argument("--engine", default="torch", help="torch (eager) or onnxruntime (CPU) (default torch)")
        q.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as in the paper)")
        q.add_argument("--batch-size", type=int, default=1, help="batch size (default 1, as in the paper)")
        q.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128, as in the paper)")
        q.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
        q.add_argument("--repeats", type=int, default=20, help="timed runs; median and p90 reported (default 20)")
        q.add_argument("--clock", default="wall",
                       help="wall (default; what users wait) or cpu (process CPU time: with --threads 1 it ignores "
                            "time other processes take on a shared machine)")

    q = stages.add_parser("profile", help="measure architectures spread over a space, plus BERT-base (JSONL)")
    q.add_argument("--space", default="paper-mlm", help="paper-mlm, paper-kd or a YAML/JSON file (default paper-mlm)")
    q.add_argument("--samples", type=int, required=True, help="architectures to measure (besides BERT-base)")
    q.add_argument("--out", type=Path, required=True, help="JSON-lines file, one measurement per line")
    q.add_argument("--seed", type=int, default=0, help="seed of the planned list (default 0)")
    q.add_argument("--resume", action="store_true", help="measure only architectures missing from --out")
    q.add_argument("--overwrite", action="store_true", help="discard an existing --out and start again")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    timing_options(q)
    q.set_defaults(handler=_run_latency_profile)

    q = stages.add_parser("fit", help="fit the MLP latency predictor (and a FLOPs baseline) on profiled data")
    q.add_argument("--data", type=Path, required=True, help="JSONL written by 'latency profile'")
    q.add_argument("--out", type=Path, required=True, help="predictor file (JSON)")
    q.add_argument("--holdout", type=float, default=0.2, help="fraction held out for metrics (default 0.2)")
    q.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default 0)")
    q.add_argument("--hidden", type=int, default=64, help="MLP hidden width (default 64)")
    q.add_argument("--epochs", type=int, default=3000, help="full-batch Adam steps (default 3000)")
    q.set_defaults(handler=_run_latency_fit)

    q = stages.add_parser("predict", help="predicted latency of architectures")
    q.add_argument("--predictor", type=Path, required=True, help="file written by 'latency fit'")
    q.add_argument("--arch", action="append", required=True, help="architecture, e.g. L5-H564-F1054-A8-Q512 (repeatable)")
    q.add_argument("--space", help="require the predictor to be fitted on this space (paper-mlm, paper-kd or a file)")
    q.set_defaults(handler=_run_latency_predict)

    q = stages.add_parser("check", help="measure architectures now and compare with the predictor")
    q.add_argument("--predictor", type=Path, required=True, help="file written by 'latency fit'")
    q.add_argument("--arch", action="append", required=True, help="architecture (repeatable)")
    q.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    q.add_argument("--repeats", type=int, default=20, help="timed runs (default 20)")
    q.set_defaults(handler=_run_latency_check)


def _settings(args: argparse.Namespace):
    from .latency import LatencySettings

    return LatencySettings(engine=args.engine, batch_size=args.batch_size, seq_len=args.seq_len,
                           threads=args.threads, warmup=args.warmup, repeats=args.repeats, clock=args.clock)


def _run_latency_profile(args: argparse.Namespace) -> int:
    from .latency import profile

    settings = _settings(args)
    records = profile(args.space, args.samples, args.out, settings, seed=args.seed, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress, arguments=vars(args))
    reference = next(r for r in records if r["reference"])
    print(f"{len(records)} measurements ({settings.engine}, {settings.threads} thread(s), batch {settings.batch_size}, "
          f"seq {settings.seq_len}, {settings.clock} clock) in {args.out}; BERT-base median {reference['latency']['median_ms']:.1f} ms")
    return 0


def _run_latency_fit(args: argparse.Namespace) -> int:
    from .latency import fit, write_output_config

    predictor, report = fit(args.data, holdout=args.holdout, seed=args.seed, hidden=args.hidden, epochs=args.epochs)
    predictor.save(args.out)
    write_output_config(args.out, vars(args))
    print(f"fitted on {report['n_train']} architectures, held out {report['n_heldout']}:")
    for name in ("mlp", "baseline"):
        m = report[name]
        print(f"  {name:<9} RMSE {m['rmse_ms']:.2f} ms  MAPE {m['mape_pct']:.2f}%  Spearman {m['spearman']:.4f}")
    if predictor.reference_ms is not None:
        print(f"BERT-base reference {predictor.reference_ms:.1f} ms; predictor written to {args.out}")
    return 0


def _run_latency_predict(args: argparse.Namespace) -> int:
    from .latency import LatencyPredictor
    from .space import Arch, SearchSpace

    predictor = LatencyPredictor.load(args.predictor, space=SearchSpace.load(args.space) if args.space else None)
    for text in args.arch:
        arch = Arch.parse(text)
        ms = predictor.predict(arch)
        speedup = f"  ({predictor.reference_ms / ms:.1f}x faster than BERT-base)" if predictor.reference_ms else ""
        outside = "" if predictor.covers(arch) else "  [outside the profiled space: extrapolated]"
        print(f"{arch}  {ms:.2f} ms{speedup}{outside}")
    return 0


def _run_latency_check(args: argparse.Namespace) -> int:
    from .latency import check

    rows = check(args.predictor, args.arch, warmup=args.warmup, repeats=args.repeats)
    print(f"{'architecture':<24} {'predicted':>10} {'measured':>10} {'error':>8}")
    for row in rows:
        print(f"{row['arch']:<24} {row['predicted_ms']:>8.2f}ms {row['measured_ms']:>8.2f}ms {row['error_pct']:>+7.1f}%")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in 'demo' config: no data files, offline, ~10 min on 2 CPUs")
    p.add_argument("--out", type=Path, default=Path("autotinybert-demo"), help="run directory (default ./autotinybert-demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override an option of the demo config, e.g. --set pretrain.max_steps=50 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --out first (default: continue it)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    args.config = "demo"
    return _run_develop(args)


def _add_develop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("develop", help="the efficient development pipeline: pretrain, latency, search, extract, "
                                       "further-train, fine-tune, report (resumable)")
    p.add_argument("--config", required=True, help="demo, cpu-small, paper-mlm, paper-kd, or a YAML file")
    p.add_argument("--out", type=Path, required=True, help="run directory; rerunning continues it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config option, e.g. --set search.method=evolved (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --out first (default: continue it)")
    p.set_defaults(handler=_run_develop)


def _run_develop(args: argparse.Namespace) -> int:
    import time

    from .develop import develop, final_models, load_config, remove_run

    config = load_config(args.config, args.set)
    _quiet_transformers()
    if args.overwrite:
        remove_run(args.out)
    started = time.perf_counter()
    manifest = develop(config, args.out)
    report = manifest["stages"]["report"]["outputs"]
    print(f"\ndone in {time.perf_counter() - started:.0f} s (all attempts: "
          f"{sum(e.get('wall_seconds', 0) for e in manifest['stages'].values()):.0f} s)")
    print(f"report:          {report['html']}\n                 {report['markdown']}")
    for target, path in final_models(manifest).items():
        print(f"model {target:>9}: {path}")
    print("load a model with transformers.AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML + markdown report and model cards of a develop / demo run")
    p.add_argument("run_dir", type=Path, help="the --out directory of 'autotinybert develop' or 'demo'")
    p.add_argument("--out", type=Path, help="report directory (default RUN_DIR/report)")
    p.add_argument("--title", help="page title")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    paths = build_report(args.run_dir, args.out, title=args.title)
    cards = [p for k, p in paths.items() if k.startswith("card")]
    print(f"report: {paths['html']}\n        {paths['markdown']}\nmodel cards: {len(cards)} (README.md in each exported model)")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="one-shot SuperPLM pre-training, or further training of one --arch")
    data = p.add_argument_group("data")
    data.add_argument("--corpus", nargs="+", required=True,
                      help="text files / directories of .txt (one sentence per line, blank line between documents) "
                           "or hf:NAME[:CONFIG] (needs internet)")
    data.add_argument("--valid-corpus", nargs="+", help="held-out text (default: every 50th document of --corpus)")
    data.add_argument("--text-column", default="text", help="text column of an hf: corpus (default text)")
    data.add_argument("--tokenizer", help="checkpoint directory whose tokenizer to use (e.g. the teacher)")
    data.add_argument("--vocab-size", type=int, help="train a WordPiece vocabulary of this size on the corpus")
    data.add_argument("--seq-len", type=int, default=128, help="packed sequence length (default 128)")
    data.add_argument("--cache-dir", help="tokenised-corpus cache (default ~/.cache/autotinybert/data)")
    model = p.add_argument_group("model")
    model.add_argument("--space", default="paper-mlm", help="paper-mlm, paper-kd or a YAML/JSON file")
    for dim in ("layers", "hidden", "ffn", "heads", "qkv"):
        model.add_argument(f"--max-{dim}", type=int, help=f"shrink the space's maximum {dim} (small machines)")
    model.add_argument("--objective", choices=["mlm", "kd", "both"], default="mlm")
    model.add_argument("--teacher", help="local BERT-family checkpoint for --objective kd/both")
    model.add_argument("--sampling", choices=["random", "per-worker", "sandwich"], default="random")
    model.add_argument("--samples-per-batch", type=int, default=1, help="sub-models per step, gradients summed")
    model.add_argument("--arch", help="train this one architecture (further training), e.g. L4-H312-F1200-A12-Q312")
    model.add_argument("--init", help="initial weights: a SuperPLM directory or an extracted checkpoint")
    train = p.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=32, help="sequences per worker per micro-batch")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--eval-every", type=int, default=200)
    train.add_argument("--eval-batches", type=int, default=4)
    train.add_argument("--save-every", type=int, default=200)
    p.add_argument("--out", required=True, help="run directory; it is also a SuperPLM checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainSettings, pretrain

    _quiet_transformers()
    limits = {dim: getattr(args, f"max_{dim}") for dim in ("layers", "hidden", "ffn", "heads", "qkv")
              if getattr(args, f"max_{dim}") is not None}
    settings = PretrainSettings(
        out=args.out, corpus=args.corpus, valid_corpus=args.valid_corpus, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, space=args.space, space_limits=limits, objective=args.objective,
        teacher=args.teacher, sampling=args.sampling, samples_per_batch=args.samples_per_batch, arch=args.arch,
        init=args.init, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, seq_len=args.seq_len, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, cache_dir=args.cache_dir, text_column=args.text_column,
        progress=not args.no_progress,
    )
    summary = pretrain(settings, resume=args.resume)
    if summary.get("validation"):
        print(f"{'architecture':<26} {'MLM loss':>9} {'MLM acc':>8}" + (f" {'KD loss':>8}" if args.objective != "mlm" else ""))
        for arch, row in summary["validation"].items():
            kd = f" {row['kd_loss']:>8.4f}" if "kd_loss" in row else ""
            print(f"{arch:<26} {row['mlm_loss']:>9.3f} {row['mlm_accuracy']:>8.3f}{kd}")
    print(f"{summary['steps']} steps, {summary['tokens_per_second']:,} tokens/s; SuperPLM in {args.out}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search architectures of a SuperPLM under latency targets")
    # Options are checked in the handler (not required=True) so that 'search correlate' parses too.
    _add_evaluator_options(p)
    p.add_argument("--predictor", type=Path, help="latency predictor file ('latency fit' output)")
    _add_target_options(p)
    p.add_argument("--method", default="evolved", help="random, fast or evolved (default evolved)")
    p.add_argument("--evaluator", default="proxy",
                   help="proxy (inherited weights, held-out MLM; seconds) or finetune (fine-tuned dev score; minutes)")
    p.add_argument("--generations", type=int, help="generations (default 10; fast: 1)")
    p.add_argument("--generation-size", type=int, default=25, help="architectures per generation (default 25)")
    p.add_argument("--explore-rate", type=float, default=0.5, help="evolved: chance a child is a fresh random one (0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the search in --out; nothing is evaluated twice")
    p.add_argument("--no-plot", action="store_true", help="do not draw pareto.png")
    p.set_defaults(handler=_run_search)
    stages = p.add_subparsers(dest="search_command", metavar="STAGE")
    q = stages.add_parser("correlate", help="Spearman correlation of proxy vs fine-tuned fitness on sampled architectures")
    _add_evaluator_options(q)
    q.add_argument("--samples", type=int, default=12, help="architectures to score with both evaluators (default 12)")
    q.add_argument("--predictor", type=Path, help="sample inside these targets' latency windows (with --speedup/--target-ms)")
    _add_target_options(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the sample and of the proxy batches")
    q.add_argument("--out", type=Path, help="output directory (correlate.json, evaluation states)")
    q.add_argument("--resume", action="store_true", help="continue in --out; nothing is evaluated twice")
    q.set_defaults(handler=_run_search_correlate)


def _add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speedup", type=float, action="append", default=[],
                   help="target: this many times faster than BERT-base on the predictor's device (repeatable)")
    p.add_argument("--target-ms", type=float, action="append", default=[], help="target latency in ms (repeatable)")
    p.add_argument("--window", type=float, nargs=2, default=[0.85, 1.1], metavar=("LOW", "HIGH"),
                   help="candidate latency window as factors of the target (default 0.85 1.1)")
    p.add_argument("--grid-step-hidden", type=int, default=16, help="hidden-size step of the search grid (default 16)")
    p.add_argument("--grid-step-ffn", type=int, default=32, help="FFN-size step of the search grid (default 32)")


def _add_evaluator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--supernet", type=Path, help="SuperPLM checkpoint directory (pretrain / init output)")
    p.add_argument("--device", default="cpu", help="torch device for the evaluator (default cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="evaluate each generation in this many processes (default 1; cores are split between them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    proxy = p.add_argument_group("proxy evaluator")
    proxy.add_argument("--metric", default="mlm_accuracy", help="proxy fitness: mlm_accuracy, mlm_loss or kd_loss")
    proxy.add_argument("--teacher", help="teacher checkpoint for --metric kd_loss")
    proxy.add_argument("--valid-corpus", nargs="+", help="held-out text for the proxy evaluator")
    proxy.add_argument("--cache-dir", help="tokenised-corpus cache (default ~/.cache/autotinybert/data)")
    proxy.add_argument("--seq-len", type=int, help="sequence length (default: the SuperPLM's pre-training one, else 128)")
    proxy.add_argument("--eval-batch-size", type=int, default=32, help="proxy batch size (default 32)")
    proxy.add_argument("--eval-batches", type=int, default=8, help="fixed held-out batches per architecture (default 8)")
    ft = p.add_argument_group("finetune evaluator (each candidate is fine-tuned in memory; fitness = mean dev score)")
    ft.add_argument("--task", action="append", default=[], metavar="TASK",
                    help="GLUE / SQuAD task to fine-tune on (repeatable; the paper: mnli and squad)")
    ft.add_argument("--data-dir", type=Path, help="glue_data/ (classic layout) or the folder of the SQuAD JSON files")
    ft.add_argument("--hub", action="store_true", help="read the task data from the Hugging Face hub (needs internet)")
    ft.add_argument("--train-file", type=Path, help="SQuAD training JSON file")
    ft.add_argument("--dev-file", type=Path, help="SQuAD dev JSON file")
    ft.add_argument("--ft-epochs", type=float, default=2.0, help="fine-tuning epochs per candidate (default 2)")
    ft.add_argument("--ft-max-steps", type=int, help="fine-tuning steps per candidate (overrides --ft-epochs)")
    ft.add_argument("--ft-lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    ft.add_argument("--ft-batch-size", type=int, default=32, help="batch size (default 32)")
    ft.add_argument("--ft-max-train-examples", type=int, default=5000,
                    help="train on a seeded subset of this many examples (default 5000)")
    ft.add_argument("--ft-max-eval-examples", type=int, help="score on a seeded subset of each dev set (default: all)")
    ft.add_argument("--ft-max-seq-length", type=int, help="tokens per input (default 128 for GLUE, 384 for SQuAD)")
    ft.add_argument("--ft-seed", type=int, default=42, help="seed of the head, shuffling and dropout (default 42)")


def _finetune_evaluator_options(args: argparse.Namespace) -> dict:
    """`FinetuneEvaluator` keyword arguments (checked when the evaluator is built)."""
    from .tasks.finetune import FinetuneSettings

    settings = FinetuneSettings(epochs=args.ft_epochs, max_steps=args.ft_max_steps, learning_rate=args.ft_lr,
                                batch_size=args.ft_batch_size, max_train_examples=args.ft_max_train_examples,
                                max_eval_examples=args.ft_max_eval_examples, max_seq_length=args.ft_max_seq_length,
                                seed=args.ft_seed, group_by_length=True)
    return dict(tasks=args.task, data_dir=args.data_dir, hub=args.hub, train_file=args.train_file,
                dev_file=args.dev_file, settings=settings)


def _check_grid_steps(args: argparse.Namespace) -> None:
    for name in ("grid_step_hidden", "grid_step_ffn"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")


def _run_search_correlate(args: argparse.Namespace) -> int:
    from .search_stage import run_correlate

    missing = [f"--{name}" for name in ("supernet", "out") if getattr(args, name) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    _quiet_transformers()
    _check_grid_steps(args)
    proxy = dict(valid_corpus=args.valid_corpus or [], metric=args.metric, teacher=args.teacher, seq_len=args.seq_len,
                 batch_size=args.eval_batch_size, batches=args.eval_batches, cache_dir=args.cache_dir, device=args.device)
    summary = run_correlate(
        supernet=args.supernet, out=args.out, samples=args.samples, seed=args.seed, proxy=proxy,
        finetune={**_finetune_evaluator_options(args), "device": args.device}, predictor=args.predictor,
        speedups=args.speedup, target_ms=args.target_ms, window=tuple(args.window),
        grid_step_hidden=args.grid_step_hidden, grid_step_ffn=args.grid_step_ffn, workers=args.workers,
        resume=args.resume, progress=not args.no_progress, arguments=vars(args))
    print(f"{'architecture':<24} {'latency':>9} {'proxy':>8} {'finetune':>9}")
    for row in summary["rows"]:
        ms = f"{row['latency_ms']:.2f}ms" if row["latency_ms"] is not None else "-"
        print(f"{row['arch']:<24} {ms:>9} {row['proxy']:>8.4f} {row['finetune']:>9.2f}")

    def shown(name: str) -> str:
        value, p_value = summary[name], summary[f"{name}_p"]
        return "undefined (a constant fitness)" if value is None else f"{value:+.3f} (p {p_value:.3f})"

    print(f"Spearman {shown('spearman')}, Kendall {shown('kendall')} over {summary['samples']} architectures; "
          f"results in {args.out / 'correlate.json'}")
    return 0


def _run_search(args: argparse.Namespace) -> int:
    from .search import SearchSettings
    from .search_stage import run_search_stage

    missing = [f"--{name}" for name in ("supernet", "predictor", "out") if getattr(args, name) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    _quiet_transformers()
    generations = args.generations if args.generations is not None else (1 if args.method == "fast" else 10)
    settings = SearchSettings(method=args.method, generations=generations, generation_size=args.generation_size,
                              explore_rate=args.explore_rate, window=tuple(args.window), seed=args.seed)
    _check_grid_steps(args)
    summary = run_search_stage(
        supernet=args.supernet, predictor=args.predictor, speedups=args.speedup, target_ms=args.target_ms,
        settings=settings, evaluator=args.evaluator, valid_corpus=args.valid_corpus, out=args.out,
        resume=args.resume, grid_step_hidden=args.grid_step_hidden, grid_step_ffn=args.grid_step_ffn,
        metric=args.metric, teacher=args.teacher, seq_len=args.seq_len, eval_batch_size=args.eval_batch_size,
        eval_batches=args.eval_batches, cache_dir=args.cache_dir, device=args.device,
        progress=not args.no_progress, plot=not args.no_plot, arguments=vars(args),
        finetune=_finetune_evaluator_options(args) if args.evaluator == "finetune" else None, workers=args.workers)
    print(f"{'target':<10} {'window (ms)':<17} {'candidates':>10} {'best architecture':<24} {'latency':>9} {'fitness':>8}")
    for row in summary["targets"]:
        low, high = row["window_ms"]
        best = row["best"]
        print(f"{row['target']['name']:<10} {f'{low:.2f}..{high:.2f}':<17} {row['candidates']:>10} {best['arch']:<24} "
              f"{best['latency_ms']:>7.2f}ms {best['fitness']:>8.4f}")
    print(f"{summary['new_evaluations']} new evaluations ({summary['evaluations']} in total); results in {args.out}")
    return 0


def _add_not_built(sub: argparse._SubParsersAction, name: str, what: str) -> None:
    p = sub.add_parser(name, help=f"{what} (not built yet)")
    p.set_defaults(handler=lambda args, _name=name, _what=what: _not_built(_name, _what))


def _not_built(name: str, what: str) -> int:
    raise UserError(f"'{name}' ({what}) is not built in this version yet; see the README's roadmap")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="autotinybert",
        description="Find and build the best tiny BERT for a latency budget on your device.",
    )
    parser.add_argument("--version", action="version", version=f"autotinybert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_space(sub)
    _add_init(sub)
    _add_extract(sub)
    _add_pretrain(sub)
    _add_latency(sub)
    _add_search(sub)
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_develop(sub)
    _add_report(sub)
    for name, what in _NOT_BUILT.items():
        _add_not_built(sub, name, what)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _NOT_BUILT:  # unbuilt stages accept anything, then explain
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"autotinybert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autotinybert {args.command}: interrupted; rerun the same command to start again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
