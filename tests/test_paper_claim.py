"""bench/paper_claim.py: the BERT-style baseline rule and the equal-latency matching logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from autotinybert.space import Arch, SearchSpace

_PATH = Path(__file__).resolve().parents[1] / "bench" / "paper_claim.py"
sys.path.insert(0, str(_PATH.parent))  # the bench imports its sibling jobs.py
_spec = importlib.util.spec_from_file_location("paper_claim", _PATH)
claim = importlib.util.module_from_spec(_spec)
sys.modules["paper_claim"] = claim  # dataclasses look their module up
_spec.loader.exec_module(claim)


def test_bert_style_follows_the_hand_made_ratios():
    arch = claim.bert_style(3, 192)
    assert arch == Arch(3, 192, 768, 3, 192)
    assert arch.is_bert_compatible and arch.head_size == 64
    assert claim.parse_baseline("l4-h128") == Arch(4, 128, 512, 2, 128)
    assert claim.parse_baseline("L4-H128-F512-A2-Q128") == Arch(4, 128, 512, 2, 128)
    with pytest.raises(ValueError):
        claim.bert_style(4, 144)  # 144 / 64 heads is not whole
    with pytest.raises(ValueError):
        claim.parse_baseline("L4-H128-F256-A2-Q128")  # not BERT's d_f = 4 d_m


def test_depth_space_fixes_only_the_layers():
    space = SearchSpace.from_dict({"mode": "mlm", "layers": {"min": 1, "max": 4}, "hidden": {"min": 128, "max": 256, "step": 16},
                                   "ffn": {"min": 128, "max": 1024, "step": 16}, "heads": {"min": 1, "max": 4}})
    fixed = claim.depth_space(space, 3)
    assert fixed.layers.min == fixed.layers.max == 3
    assert fixed.hidden == space.hidden and fixed.ffn == space.ffn and fixed.heads == space.heads
    assert fixed.contains(Arch(3, 160, 320, 2, 128)) and not fixed.contains(Arch(2, 160, 320, 2, 128))


def _toy_pair(a: Arch, b: Arch) -> tuple[float, float]:
    """Latency proportional to the weight matrices' size (a stand-in for timing)."""
    cost = lambda x: x.num_hidden_layers * x.hidden_size * (4 * x.qkv_size + 2 * x.intermediate_size) / 1e5  # noqa: E731
    return cost(a), cost(b)


def test_matching_takes_the_fittest_within_tolerance():
    baseline = claim.bert_style(4, 128)  # cost 4*128*(512+1024)
    too_slow = Arch(4, 256, 1024, 4, 256)
    matched = Arch(4, 192, 272, 2, 128)   # 192*(512+544) vs 128*1536: ratio 1.031
    also_ok = Arch(4, 128, 512, 2, 128)
    result = claim.match_equal_latency([too_slow, matched, also_ok], baseline, _toy_pair, tolerance=0.05)
    base_ms = _toy_pair(baseline, baseline)[0]
    assert result["matched"] and result["arch"] == str(matched)
    assert result["ratio"] == pytest.approx(_toy_pair(matched, baseline)[0] / base_ms)
    assert result["ratio"] == pytest.approx(1.03125)
    assert [c["arch"] for c in result["checked"]] == [str(too_slow), str(matched)]  # stops at the first match


def test_matching_reports_the_closest_when_nothing_matches():
    baseline = claim.bert_style(4, 128)
    far, nearer = Arch(4, 256, 1024, 4, 256), Arch(4, 160, 1024, 2, 128)
    result = claim.match_equal_latency([far, nearer], baseline, _toy_pair, tolerance=0.01)
    assert not result["matched"] and result["arch"] == str(nearer) and len(result["checked"]) == 2
    assert not claim.match_equal_latency([far, nearer], baseline, _toy_pair, max_checks=1)["arch"] == str(nearer)


def test_steps_to_reach():
    curve = [(25, 7.0), (50, 6.5), (75, 6.6), (100, 6.2)]
    assert claim.steps_to_reach(curve, 6.5) == 50
    assert claim.steps_to_reach(curve, 6.3) == 100
    assert claim.steps_to_reach(curve, 6.0) is None
