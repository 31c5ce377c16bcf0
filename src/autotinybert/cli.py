"""The `autotinybert` command: argument parsing only; each stage's work lives in its module.

User errors (`UserError`) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError

# Stages that later issues build; each says so clearly instead of failing obscurely.
_NOT_BUILT = {
    "pretrain": "one-shot SuperPLM pre-training",
    "latency": "latency profiling and the latency predictor",
    "search": "architecture search under a latency constraint",
    "develop": "the whole efficient-development pipeline",
    "report": "HTML / markdown reports",
}


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


def _run_extract(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

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


def _settings(args: argparse.Namespace):
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


def _quiet_transformers() -> None:
    # The load reports list the freshly initialised head on every run; we check loading ourselves.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _run_finetune(args: argparse.Namespace) -> int:
    from .tasks.run import results_table, run_finetune

    _quiet_transformers()
    _set_threads(args.threads)
    results = run_finetune(model=args.model, tasks=args.task, out=args.out, settings=_settings(args),
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
    results = run_evaluate(model=args.model, tasks=args.task, settings=_settings(args), data_dir=args.data_dir,
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
    from .modeling import init_supernet_checkpoint

    summary = init_supernet_checkpoint(
        space=args.space, out_dir=args.out, tokenizer_dir=args.tokenizer, vocab_size=args.vocab_size,
        teacher_hidden_size=args.teacher_hidden_size, seed=args.seed, overwrite=args.overwrite,
        arguments=vars(args),
    )
    print(f"SuperPLM ({summary['mode']} space, largest {summary['largest']}, vocab {summary['vocab_size']}, "
          f"{summary['parameters'] / 1e6:.1f}M parameters) written to {args.out}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a small end-to-end run on built-in defaults")
    p.add_argument("--out", type=Path, default=Path("autotinybert-demo"), help="output directory (default ./autotinybert-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _add_not_built(sub: argparse._SubParsersAction, name: str, what: str) -> None:
    p = sub.add_parser(name, help=f"{what} (not built yet)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
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
    _add_finetune(sub)
    _add_evaluate(sub)
    for name, what in _NOT_BUILT.items():
        _add_not_built(sub, name, what)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
