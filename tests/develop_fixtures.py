"""A tiny `develop` configuration over fixture data written by the tests (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import yaml

SENTENCES = [
    "the cat sat on the mat and looked at the door",
    "a dog ran across the park to find the ball",
    "we read the book before the lesson started today",
    "she wrote a long letter to her friend in the city",
    "the river flows past the old mill near the town",
    "he said the train would arrive late in the evening",
    "birds sing in the trees when the sun comes up",
    "they built a small house next to the quiet lake",
]
POSITIVE = ["good", "great", "happy", "lovely", "wonderful", "nice", "excellent", "joy", "bright", "kind"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "nasty", "poor", "pain", "dark", "cruel"]


def write_fixture_data(root: Path) -> dict[str, str]:
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    docs = ["\n".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))]
    (corpus / "train.txt").write_text("\n\n".join(docs * 3) + "\n")
    (root / "valid.txt").write_text("\n\n".join(docs[:3]) + "\n")
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True, exist_ok=True)
    rows = [f"{w} day\t1" for w in POSITIVE] + [f"{w} day\t0" for w in NEGATIVE]
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[::3]) + "\n")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({"mode": "mlm", "layers": {"min": 1, "max": 2}, "hidden": {"min": 12, "max": 36, "step": 4},
                                     "ffn": {"min": 16, "max": 48, "step": 4}, "heads": {"min": 1, "max": 3}, "head_size": 8}))
    return {"corpus": str(corpus), "valid": str(root / "valid.txt"), "glue": str(root / "glue"), "space": str(space)}


def tiny_config(root: Path) -> dict:
    paths = write_fixture_data(root)
    return {
        "run": {"seed": 0, "threads": 1, "progress": False},
        "data": {"corpus": [paths["corpus"]], "valid_corpus": [paths["valid"]], "tasks_dir": paths["glue"],
                 "cache_dir": str(root / "cache")},
        "pretrain": {"space": paths["space"], "vocab_size": 120, "seq_len": 24, "max_steps": 6, "batch_size": 4,
                     "lr": 0.001, "log_every": 2, "eval_every": 3, "eval_batches": 1, "save_every": 2},
        "latency": {"samples": 8, "warmup": 0, "repeats": 2, "max_repeats": 4, "epochs": 600, "hidden": 16},
        "search": {"range_fractions": [0.7], "method": "random", "generation_size": 3, "generations": 1,
                   "grid_step_hidden": 4, "grid_step_ffn": 4, "eval_batch_size": 2, "eval_batches": 1,
                   "window": [0.5, 1.5]},
        "extract": {"onnx": False, "latency_repeats": 2},
        "further_train": {"max_steps": 2, "batch_size": 2, "log_every": 1, "eval_every": 2, "save_every": 2,
                          "eval_batches": 1},
        "finetune": {"tasks": ["sst2"], "max_steps": 3, "batch_size": 4, "max_seq_length": 8, "eval_batch_size": 8},
    }


def write_config(root: Path, config: dict) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
