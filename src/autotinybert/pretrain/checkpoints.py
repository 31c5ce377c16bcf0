"""The checkpoints a pre-training run writes and reads.

* Its own, ``out/checkpoint`` (`save_checkpoint`, `load_checkpoint`): weights, optimizer, step and
  settings, with the SuperPLM files in ``out`` refreshed first; a ``--resume`` that changes an
  option not declared ``resume="free"`` is refused (`_RESUME_INVARIANT`).
* The one it starts from, ``--init`` (`initial_weights`, `inherited_config`): a SuperPLM (all of
  it, or its slice) or an extracted checkpoint.
* `weights_digest`: equal digests mean identical weights (workers in sync, resumes exact).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import training
from ..checkpoint import checkpoint_config, load_pretrained, load_supernet, publish_supernet
from ..errors import UserError
from ..modeling import SuperBertConfig, SuperBertForPreTraining
from ..options import resume_invariant
from ..settings import PretrainSettings
from ..space import Arch
from ..training import Schedule

# Changing these between a run and its --resume would silently change what is trained: every
# option not declared ``resume="free"`` (progress, logging, the step budget, paths).
_RESUME_INVARIANT = resume_invariant(PretrainSettings)
CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(out: Path, model, optimizer, schedule: Schedule, step: int, tokenizer,
                    settings: PretrainSettings) -> None:
    """Refresh the SuperPLM files in ``out`` (so ``autotinybert extract --supernet out`` works
    mid-training), then commit ``out/checkpoint`` (weights + optimizer + step + settings).

    This order keeps every kill harmless: killed before the commit, the run resumes from the
    previous checkpoint and rewrites the same SuperPLM files when it passes this step again.
    """
    publish_supernet(model, out)
    training.save_checkpoint(out / CHECKPOINT_DIR, model, optimizer,
                             {"step": step, "workers": _world(), "settings": asdict(settings)})


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def load_checkpoint(out: Path, model, optimizer, settings: PretrainSettings) -> int:
    """Restore a run from ``out/checkpoint``; returns the step to continue from (0: none yet)."""
    ckpt = out / CHECKPOINT_DIR
    if not training.has_checkpoint(ckpt):
        return 0

    def same_run(state: dict) -> None:
        saved = state.get("settings", {})
        changed = [k for k in _RESUME_INVARIANT if k in saved and saved[k] != asdict(settings)[k]]
        if state.get("workers", 1) != _world():
            changed.append(f"number of workers ({state.get('workers', 1)} then, {_world()} now)")
        if changed:
            raise UserError(f"--resume with different {', '.join(changed)} than the checkpoint; "
                            "rerun with the original arguments (only --max-steps and logging may change)")

    state, _ = training.load_checkpoint(ckpt, model, optimizer, check=same_run)
    return int(state["step"])


def _exported_state(path: Path, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """Weights of an extracted checkpoint under SuperPLM names (the MLM decoder is tied, so dropped)."""
    from transformers import AutoModelForMaskedLM

    model = load_pretrained(AutoModelForMaskedLM, path, "--init", trust_remote_code)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}


def initial_weights(model: SuperBertForPreTraining, settings: PretrainSettings) -> None:
    """``--init``: a SuperPLM (its slice for ``--arch``, else all of it) or an extracted checkpoint."""
    path = Path(settings.init)
    model_type = checkpoint_config(path, "--init").get("model_type")
    if model_type == SuperBertConfig.model_type:
        source = load_supernet(path)
        # One architecture (--arch), or the largest of a space shrunk by --max-* limits: its slice.
        wanted = Arch.parse(settings.arch) if settings.arch else model.config.search_space.largest()
        same = wanted == source.config.search_space.largest()
        state = source.state_dict() if same else source.sliced_state_dict(wanted)
        if not same and source.fit_dense is not None:  # the KD fit layer reads the first d_m features
            state["fit_dense.weight"] = source.fit_dense.weight[:, : wanted.hidden_size].detach().clone()
            state["fit_dense.bias"] = source.fit_dense.bias.detach().clone()
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.decoder")}
    else:
        state = _exported_state(path, settings.trust_remote_code)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"--init {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model needs "
                        f"{tuple(expected[wrong[0]].shape)}; the checkpoint holds another architecture or vocabulary")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


_INHERITED = ("hidden_act", "layer_norm_eps", "max_position_embeddings", "type_vocab_size", "initializer_range",
              "init_from")


def inherited_config(settings: PretrainSettings) -> dict[str, Any]:
    """Model-wide fields of the ``--init`` checkpoint (activation, LayerNorm epsilon, positions, where
    it came from): a model started from a pre-trained one keeps its source's."""
    path = Path(settings.init) / "config.json" if settings.init else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))  # a SuperPLM's or an extracted model's
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the checkpoint check that loads --init names what is wrong with the file
    return {k: config[k] for k in _INHERITED if k in config} if isinstance(config, dict) else {}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters: equal digests mean identical weights (workers in sync, resumes exact)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
