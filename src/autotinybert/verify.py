"""Verify before shipping: a target is met when the *measured* speed-up over a reference timed side by
side with the model reaches the speed-up the target asks for.

The search trusts the latency predictor; the predictor was fitted minutes or hours earlier, the host's
speed drifts by tens of percent between minutes, and a predictor can be biased in one region of the
space. So each target's best few candidates (`shortlist`: the best, then the best that is predicted
faster, ...) and the reference (the SuperPLM's largest architecture: the pre-trained source, or the
space's largest) are timed together in one interleaved run, in the predictor's deployed form; each
timing is divided by the reference's in the same round (`runner.paced_summary`), so the host's drift
cancels. Each target ships the best-ranked candidate whose measured ratio meets it without
overshooting it by more than `OVERSHOOT` (`choose`); else the best-ranked that meets it; when none
does, the fastest measured ships and the record says by how much it misses.

**Correct**: a target whose shipped model misses that band (short of the target, or more than
`OVERSHOOT` faster: a larger, more accurate model would have fitted) shows where the predictor is
biased. `calibration` is the median of measured / predicted ratio over its timed candidates, and the
caller searches again for the target's budget divided by it (`corrected_target_ms`); the new
shortlist is timed the same way and `merge_correction` ships from both by the same rule.

The record (`verify_targets`) keeps, per candidate, the predicted and measured speed-ups and the
signed error of the prediction (negative: slower than predicted).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Callable, Sequence

from .latency import LatencySettings, load_average, measure_many
from .search import preference
from .space import Arch

# How much faster than its target a shipped model may measure before the target is searched again: a user
# who asked for 3x and gets 3.5x got a smaller model than fits.
OVERSHOOT = 0.10

# measure(candidates, reference) -> ({arch: its latency / the reference's, median over rounds},
#                                    the reference's median ms, or None when not timed in ms)
Measure = Callable[[Sequence[str], str], tuple[dict[str, float], float | None]]


def shortlist(visits: Sequence[dict], count: int) -> list[dict]:
    """Up to ``count`` visited architectures in the search's order of preference, each predicted faster
    than every better one kept: when the best measures slower than predicted, the next is a faster
    runner-up rather than a near twin of it."""
    kept: list[dict] = []
    for visit in sorted({v["arch"]: v for v in visits}.values(), key=preference):
        if len(kept) == count:
            break
        if all(visit["latency_ms"] < k["latency_ms"] for k in kept):
            kept.append(visit)
    return kept


def choose(candidates: Sequence[dict], allowed_ratio: float) -> dict:
    """The first candidate (in preference order) whose measured ``ratio`` (its latency / the
    reference's) is at most ``allowed_ratio`` and at least ``allowed_ratio / (1 + OVERSHOOT)``; else
    the first that meets the target; else the fastest measured, marked as missing."""
    meeting = [c for c in candidates if c["ratio"] <= allowed_ratio]
    in_band = [c for c in meeting if c["ratio"] * (1 + OVERSHOOT) >= allowed_ratio]
    pick = (in_band or meeting or [min(candidates, key=lambda c: (c["ratio"], c["arch"]))])[0]
    return {"arch": pick["arch"], "met": bool(meeting), "in_band": bool(in_band),
            # how far the shipped model's measured speed-up falls short of the target's (0 when met)
            "shortfall_pct": 0.0 if meeting else round(100 * (1 - allowed_ratio / pick["ratio"]), 2)}


def measure_against(settings: LatencySettings, timer: Callable[[], float] | None = None) -> Measure:
    """Time the candidates and the reference in one interleaved run (`latency.measure_many` with the
    reference as the anchor of every round); each candidate's ratio is the median over rounds of its
    time / the reference's time in that round."""
    def measure(archs: Sequence[str], reference: str) -> tuple[dict[str, float], float | None]:
        records = measure_many(list(archs), replace(settings, interleave=max(1, len(archs))), timer=timer,
                               anchor=Arch.parse(reference))
        return {record["arch"]: record["paced"]["ratio"] for record in records}, records[0]["anchor"]["median_ms"]

    return measure


def verify_targets(targets: Sequence[dict], reference: Arch | str, predict: Callable[[Arch], float], count: int,
                   measure: Measure, *, form: str = "") -> dict[str, Any]:
    """Time each target's `shortlist` against ``reference`` (one interleaved run for all targets) and
    `choose` what ships. ``targets``: ``{"target": name, "target_ms": predicted budget, "visits": [...]}``
    (a search's results); ``predict``: the latency predictor the search used."""
    reference = str(reference)
    reference_ms = float(predict(Arch.parse(reference)))
    lists = {t["target"]: shortlist(t["visits"], count) for t in targets}
    archs = list(dict.fromkeys(v["arch"] for visits in lists.values() for v in visits))
    ratios, reference_measured_ms = measure(archs, reference)
    rows = []
    for target in targets:
        allowed = target["target_ms"] / reference_ms  # the target as a fraction of the reference's latency
        candidates = [_candidate(v, rank, ratios[v["arch"]], reference_ms, allowed)
                      for rank, v in enumerate(lists[target["target"]])]
        rows.append({"target": target["target"], "target_ms": target["target_ms"],
                     "target_speedup": round(1 / allowed, 4), **choose(candidates, allowed), "candidates": candidates})
    return {"reference": {"arch": reference, "predicted_ms": reference_ms,
                          "measured_ms": reference_measured_ms},
            "form": form, "load_average": load_average(), "targets": rows}


def calibration(row: dict) -> float:
    """A verified target's measured / predicted latency ratio, the median over its timed candidates
    (below 1: the predictor is pessimistic where this target's candidates lie)."""
    return statistics.median(c["ratio"] * c["predicted_speedup"] for c in row["candidates"])


def corrected_target_ms(row: dict) -> float:
    """The predicted budget that lands a target where it was asked, given the predictor's bias there."""
    return round(row["target_ms"] / calibration(row), 3)


def merge_correction(row: dict, corrected: dict, searched_ms: float, reference_ms: float) -> dict:
    """``row`` (a verified target) after the corrected search's verified shortlist ``corrected``
    (timed against the same target and ``reference_ms``, the reference's predicted latency): what
    ships is chosen from both by `choose`, the first round's candidates first."""
    candidates = [*row["candidates"], *({**c, "rank": len(row["candidates"]) + c["rank"], "corrected": True}
                                        for c in corrected["candidates"])]
    allowed = row["target_ms"] / reference_ms  # as `verify_targets` has it (target_speedup is rounded)
    return {**row, **choose(candidates, allowed), "candidates": candidates,
            "correction": {"calibration": round(calibration(row), 4), "searched_ms": searched_ms,
                           "shipped_before": row["arch"]}}


def speedups(predicted_ratio: float, measured_ratio: float) -> dict[str, float]:
    """A model's predicted and measured speed-ups over the reference (from its latency / the
    reference's, predicted and measured) and the signed error of the prediction: negative when the
    model measured slower than predicted."""
    return {"predicted_speedup": round(1 / predicted_ratio, 4), "measured_speedup": round(1 / measured_ratio, 4),
            "error_pct": round(100 * (predicted_ratio / measured_ratio - 1), 2)}


def _candidate(visit: dict, rank: int, ratio: float, reference_ms: float, allowed: float) -> dict:
    return {"arch": visit["arch"], "rank": rank, "fitness": visit.get("rescored", visit["fitness"]),
            "predicted_ms": visit["latency_ms"], "ratio": ratio, "meets": ratio <= allowed,
            **speedups(visit["latency_ms"] / reference_ms, ratio)}


def choose_form(forms: dict[str, float], scores: dict[str, float | None], tolerance: float) -> dict[str, Any]:
    """The form to ship: the fastest (``forms``: measured ms by form name) whose dev score is within
    ``tolerance`` points of the best fp32 score. ``scores`` maps form names to their dev score (None:
    not scored); a form that was not scored is never chosen over a scored one, and int8 forms (whose
    scores move) only when scored. Returns the form and the reason in words."""
    fp32 = [score for form, score in scores.items() if score is not None and "int8" not in form]
    floor = max(fp32) - tolerance if fp32 else None
    eligible = {form: ms for form, ms in forms.items()
                if (floor is None and "int8" not in form)
                or (floor is not None and scores.get(form) is not None and scores[form] >= floor)}
    if not eligible:
        return {"form": None, "reason": "no form was scored"}
    form = min(eligible, key=lambda f: (eligible[f], f))
    why = f"{forms[form]:.2f} ms, the fastest" + ("" if floor is None else f" within {tolerance:g} points of fp32")
    faster = [f for f in forms if forms[f] < forms[form]]
    if faster:
        why += "; faster: " + ", ".join(faster) + (" (not scored)" if floor is None else " (lost more)")
    return {"form": form, "reason": why}
