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
    "finetune": "GLUE / SQuAD fine-tuning",
    "evaluate": "GLUE / SQuAD evaluation",
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

    _quiet_transformers()
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

    _quiet_transformers()
    run_demo(args.out, overwrite=args.overwrite)
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
