"""SuperPLM checkpoint directories: `config.json` + `model.safetensors` (+ tokenizer files).

`save_supernet` writes one, `load_supernet` reads one strictly (every problem is a one-line
`UserError`; it lives in modeling, beside the classes' `from_pretrained`, and is importable from
here), `init_supernet_checkpoint` is the `init` command, `load_tokenizer` reads the tokenizer
saved beside the weights. Training state (optimizer, step) is not here: see
`training.py`, whose checkpoints a run keeps in `--out/checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, reading
from .files import atomic_write_json, atomic_write_text, atomic_write_with, staged_directory, write_stage_config
# load_supernet lives beside the model classes (their from_pretrained); importable from here too.
from .modeling import (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, _SUPERNET_CLASSES, SuperBertConfig,  # noqa: F401
                       SuperBertPreTrainedModel, load_supernet, new_supernet, tokenizer_vocab_size)
from .space import SearchSpace


def save_supernet(model: SuperBertPreTrainedModel, out_dir: str | Path) -> None:
    """config.json + model.safetensors (the directory should be a staged one; see files.py)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _name_class(model)
    model.config.to_json_file(str(out_dir / CHECKPOINT_CONFIG))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CHECKPOINT_WEIGHTS), metadata={"format": "pt"})


def _name_class(model: SuperBertPreTrainedModel) -> None:
    """Record the model class in the config (as save_pretrained does), so `load_supernet` rebuilds it."""
    if type(model).__name__ in _SUPERNET_CLASSES:
        model.config.architectures = [type(model).__name__]


def publish_supernet(model: SuperBertPreTrainedModel, out_dir: str | Path) -> None:
    """Refresh config.json + model.safetensors inside an existing directory (a run's ``--out``),
    each file replaced atomically: a reader, or a run killed meanwhile, sees old or new, whole."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _name_class(model)
    atomic_write_text(Path(out_dir) / CHECKPOINT_CONFIG, model.config.to_json_string())
    atomic_write_with(Path(out_dir) / CHECKPOINT_WEIGHTS,
                      lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def init_supernet_checkpoint(space: str, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                             vocab_size: int | None = None, teacher_hidden_size: int | None = None,
                             seed: int = 0, overwrite: bool = False,
                             arguments: dict | None = None) -> dict[str, Any]:
    """Write a randomly initialised SuperPLM checkpoint (the `init` command)."""
    search_space = SearchSpace.load(space)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
        if vocab_size is not None and vocab_size != len(tokenizer):
            raise UserError(f"--vocab-size {vocab_size} contradicts the tokenizer's {len(tokenizer)} tokens; "
                            "drop --vocab-size")
        vocab_size = len(tokenizer)
    if vocab_size is None:
        raise UserError("give --tokenizer DIR (a checkpoint with vocab.txt/tokenizer.json) or --vocab-size N")
    config = SuperBertConfig.from_space(search_space, vocab_size=vocab_size, teacher_hidden_size=teacher_hidden_size)
    model = new_supernet(config, seed)
    with staged_directory(out_dir, overwrite) as tmp:
        save_supernet(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        summary = {
            "mode": search_space.mode,
            "largest": str(search_space.largest()),
            "vocab_size": vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if arguments is not None:
            write_stage_config(tmp, arguments)
        atomic_write_json(tmp / "results.json", summary)
    return summary


def load_tokenizer(path: str | Path, flag: str = "--tokenizer"):
    """A tokenizer from a local checkpoint directory, or a `UserError` saying what is wrong."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such folder (a tokenizer or checkpoint directory)")
    with reading(path, flag, "give a folder with tokenizer files (vocab.txt or tokenizer.json)", also=(RuntimeError,)):
        return AutoTokenizer.from_pretrained(str(path))


# --- Hugging Face checkpoints given by the user (--model, --teacher, --init) ----------------------
def checkpoint_config(path: str | Path, flag: str) -> dict[str, Any]:
    """``path/config.json`` of a Hugging Face checkpoint folder, or a `UserError` naming ``flag``."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such folder")
    if not (path / CHECKPOINT_CONFIG).is_file():
        raise UserError(f"{flag} {path} has no config.json; give a Hugging Face checkpoint folder")
    with reading(path / CHECKPOINT_CONFIG, flag, "the checkpoint is damaged; re-export or re-download it"):
        config = json.loads((path / CHECKPOINT_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path / CHECKPOINT_CONFIG} is not a JSON object; the checkpoint is damaged")
    return config


def custom_code(path: str | Path, config: dict[str, Any]) -> list[str]:
    """The Python files loading ``path`` would run: none for model types the installed
    transformers knows and for our own ``autotinybert`` type (its classes come from this package,
    registered in `autotinybert.hf`, never from the folder)."""
    from transformers import CONFIG_MAPPING

    from . import hf  # noqa: F401  (registers the autotinybert type with the Auto classes)

    if config.get("model_type") in CONFIG_MAPPING:
        return []
    named = {str(v).split("--")[-1].split(".")[0] + ".py" for v in (config.get("auto_map") or {}).values()
             if isinstance(v, str)}
    return sorted(named | {p.name for p in Path(path).glob("*.py")})


def check_checkpoint(path: str | Path, flag: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Everything about a user's checkpoint folder that can be checked before any output is
    created: config.json readable, no custom code unless trusted, weights present and readable
    (safetensors header, or a pickle-free refusal later). Returns the config."""
    path = Path(path)
    config = checkpoint_config(path, flag)
    code = custom_code(path, config)
    if code and not trust_remote_code:
        raise UserError(f"{flag} {path} is a {config.get('model_type')!r} model that needs its own Python code "
                        f"({', '.join(code) or 'auto_map'}), which runs only with --trust-remote-code; pass it if "
                        "you trust that folder")
    weights = sorted(p.name for p in path.iterdir() if p.name.endswith((".safetensors", ".bin", ".safetensors.index.json",
                                                                           ".bin.index.json")))
    if not weights:
        raise UserError(f"{flag} {path} has no weights (model.safetensors); the checkpoint is incomplete")
    single, pickled = path / CHECKPOINT_WEIGHTS, path / "pytorch_model.bin"
    fix = "the file is damaged or not plain tensors; re-export or re-download the checkpoint"
    if single.is_file():
        from safetensors import safe_open

        with reading(single, flag, fix), safe_open(str(single), framework="pt") as handle:
            handle.keys()
    elif pickled.is_file():  # tensors only (weights_only): a pickle that would run code is refused, never run
        with reading(pickled, flag, fix, also=(RuntimeError,)):
            torch.load(str(pickled), map_location="cpu", weights_only=True)
    return config


def load_pretrained(auto_class: Any, path: str | Path, flag: str, trust_remote_code: bool = False, **kwargs: Any):
    """``auto_class.from_pretrained(path)`` of a user's checkpoint folder: the folder's Python
    files run only with ``trust_remote_code``; pickles load only as tensors (torch's
    ``weights_only``); any problem is one `UserError` naming ``flag`` and the folder."""
    check_checkpoint(path, flag, trust_remote_code)
    with reading(path, flag, "the checkpoint is damaged or of another kind; re-export or re-download it",
                 also=(RuntimeError,)):
        return auto_class.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
