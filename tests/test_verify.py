"""Verify before shipping (`autotinybert.verify`): what ships is the best candidate whose speed-up,
measured side by side with the reference, meets the target."""

import pytest

from autotinybert.errors import UserError
from autotinybert.space import Arch
from autotinybert.verify import (calibration, choose, choose_form, corrected_target_ms, measure_against, merge_correction,
                                shortlist, speedups, verify_targets)

REFERENCE = "L6-H384-F1536-A12-Q384"
REFERENCE_MS = 30.0  # predicted


def visit(arch: str, fitness: float, ms: float, **extra) -> dict:
    return {"arch": arch, "fitness": fitness, "latency_ms": ms, **extra}


# A 3x target (10 ms predicted): the fittest at 9.9 ms, a faster runner-up, a near twin of the best
# that is not faster (never shortlisted), and the fastest.
VISITS = [visit("L4-H256-F512-A8-Q256", 0.90, 9.9), visit("L4-H256-F480-A8-Q256", 0.89, 9.95),
          visit("L3-H256-F512-A8-Q256", 0.85, 9.0), visit("L2-H256-F512-A8-Q256", 0.70, 8.6),
          visit("L4-H256-F512-A8-Q256", 0.90, 9.9)]  # visited twice: one candidate
TARGET = {"target": "3x", "target_ms": 10.0, "visits": VISITS}


def predict(arch: Arch) -> float:
    ms = {v["arch"]: v["latency_ms"] for v in VISITS}
    return REFERENCE_MS if str(arch) == REFERENCE else ms[str(arch)]


def scripted(ratios: dict[str, float]):
    """Measured ratios (model / reference), as a side-by-side run would give them."""
    calls = []

    def measure(archs, reference):
        calls.append((list(archs), reference))
        return {arch: ratios[arch] for arch in archs}, 31.0

    measure.calls = calls
    return measure


def test_the_shortlist_is_the_best_then_each_faster_runner_up():
    kept = shortlist(VISITS, 3)
    assert [v["arch"] for v in kept] == ["L4-H256-F512-A8-Q256", "L3-H256-F512-A8-Q256", "L2-H256-F512-A8-Q256"]
    assert [v["arch"] for v in shortlist(VISITS, 1)] == ["L4-H256-F512-A8-Q256"]


def test_a_rescored_shortlist_leads_the_preference():
    visits = [*VISITS[:4], visit("L1-H256-F512-A8-Q256", 0.5, 5.0, rescored=0.95)]
    assert shortlist(visits, 2)[0]["arch"] == "L1-H256-F512-A8-Q256"


def test_the_best_ships_when_it_meets_the_target_even_if_slower_than_predicted():
    # predicted 9.9 / 30 = 0.33; measured 0.333 (slower than predicted) still meets 10 / 30.
    result = verify_targets([TARGET], REFERENCE, predict, 3, scripted(
        {"L4-H256-F512-A8-Q256": 0.333, "L3-H256-F512-A8-Q256": 0.30, "L2-H256-F512-A8-Q256": 0.28}))
    row = result["targets"][0]
    assert row["arch"] == "L4-H256-F512-A8-Q256" and row["met"] and row["shortfall_pct"] == 0
    best = row["candidates"][0]
    assert best["error_pct"] < 0 and best["meets"]  # signed: slower than predicted
    assert row["target_speedup"] == pytest.approx(3.0)


def test_a_best_that_measures_too_slow_gives_way_to_the_next_that_meets():
    measure = scripted({"L4-H256-F512-A8-Q256": 0.36, "L3-H256-F512-A8-Q256": 0.33, "L2-H256-F512-A8-Q256": 0.30})
    row = verify_targets([TARGET], REFERENCE, predict, 3, measure)["targets"][0]
    assert row["arch"] == "L3-H256-F512-A8-Q256" and row["met"]
    assert [c["meets"] for c in row["candidates"]] == [False, True, True]
    assert measure.calls == [(["L4-H256-F512-A8-Q256", "L3-H256-F512-A8-Q256", "L2-H256-F512-A8-Q256"], REFERENCE)]


def test_a_slower_than_promised_model_ships_only_when_nothing_meets_the_target():
    measure = scripted({"L4-H256-F512-A8-Q256": 0.40, "L3-H256-F512-A8-Q256": 0.37, "L2-H256-F512-A8-Q256": 0.35})
    row = verify_targets([TARGET], REFERENCE, predict, 3, measure)["targets"][0]
    assert row["arch"] == "L2-H256-F512-A8-Q256" and not row["met"]  # the fastest measured, marked
    assert row["shortfall_pct"] == pytest.approx(100 * (1 - (10 / 30) / 0.35), abs=0.01)


def test_the_prediction_error_is_negative_when_the_model_measures_slower_than_predicted():
    # predicted 1/3 of the reference's latency (3.0x), measured 0.35 of it (2.86x): 4.8 % slower.
    slower = speedups(1 / 3, 0.35)
    assert slower["predicted_speedup"] == pytest.approx(3.0) and slower["measured_speedup"] == pytest.approx(2.8571)
    assert slower["error_pct"] == pytest.approx(-4.76, abs=0.01)
    assert speedups(0.35, 1 / 3)["error_pct"] > 0


def test_choose_prefers_rank_over_speed_among_those_that_meet():
    candidates = [{"arch": "a", "ratio": 0.32}, {"arch": "b", "ratio": 0.20}]
    assert choose(candidates, 1 / 3)["arch"] == "a"


def test_a_model_far_faster_than_asked_gives_way_to_one_in_the_band():
    # target 3x (ratio 1/3): a 3.6x best overshoots by 20 %; a 3.1x runner-up is in the band.
    candidates = [{"arch": "a", "ratio": 1 / 3.6}, {"arch": "b", "ratio": 1 / 3.1}]
    assert choose(candidates, 1 / 3) == {"arch": "b", "met": True, "in_band": True, "shortfall_pct": 0.0}
    assert choose(candidates[:1], 1 / 3) == {"arch": "a", "met": True, "in_band": False, "shortfall_pct": 0.0}


# The 3x target (10 ms of 30 predicted) where the predictor is 10 % pessimistic: every candidate
# measures 0.9 x its predicted ratio, so the best (9.9 ms predicted) runs 3.37x: 12 % too fast.
PESSIMISTIC = {v["arch"]: 0.9 * v["latency_ms"] / REFERENCE_MS for v in VISITS}


def test_the_calibration_is_the_measured_bias_and_corrects_the_budget():
    row = verify_targets([TARGET], REFERENCE, predict, 3, scripted(PESSIMISTIC))["targets"][0]
    assert row["met"] and not row["in_band"]
    assert calibration(row) == pytest.approx(0.9, abs=1e-3)
    assert corrected_target_ms(row) == pytest.approx(10 / 0.9, abs=0.01)


def test_the_corrected_round_ships_its_in_band_model_and_keeps_both_rounds():
    row = verify_targets([TARGET], REFERENCE, predict, 3, scripted(PESSIMISTIC))["targets"][0]
    # The corrected search (budget 11.1 ms predicted) found L5 at 11.0 ms predicted: 0.9 x 11 / 30 -> 3.03x.
    corrected_visits = [visit("L5-H256-F512-A8-Q256", 0.93, 11.0)]
    second = verify_targets([{**TARGET, "visits": corrected_visits}], REFERENCE, lambda a: {
        REFERENCE: REFERENCE_MS, "L5-H256-F512-A8-Q256": 11.0}[str(a)], 3,
        scripted({"L5-H256-F512-A8-Q256": 0.9 * 11.0 / 30}))["targets"][0]
    merged = merge_correction(row, second, 11.111, REFERENCE_MS)
    assert merged["arch"] == "L5-H256-F512-A8-Q256" and merged["met"] and merged["in_band"]
    assert [c["rank"] for c in merged["candidates"]] == [0, 1, 2, 3] and merged["candidates"][-1]["corrected"]
    assert merged["correction"] == {"calibration": pytest.approx(0.9, abs=1e-3), "searched_ms": 11.111,
                                    "shipped_before": "L4-H256-F512-A8-Q256"}


def test_develop_searches_again_only_the_targets_outside_the_band(tmp_path, monkeypatch):
    """`develop.stages._correct`: the off-band target's corrected budget goes to a second search (its
    own folder, no other target kinds); the in-band target is left as it was."""
    from autotinybert import settings as S
    from autotinybert.develop import Run, validate_config
    from autotinybert.develop import stages
    from autotinybert.search_stage import SearchJob

    in_band = {**TARGET, "target": "2x", "target_ms": 15.0, "visits": [visit("L5-H384-F512-A12-Q384", 0.95, 14.5)]}
    measure = scripted({**PESSIMISTIC, "L5-H384-F512-A12-Q384": 0.49, "L5-H256-F512-A8-Q256": 0.9 * 11.0 / 30})
    latency = {REFERENCE: REFERENCE_MS, "L5-H384-F512-A12-Q384": 14.5, "L5-H256-F512-A8-Q256": 11.0,
               **{v["arch"]: v["latency_ms"] for v in VISITS}}
    verify = lambda targets: verify_targets(targets, REFERENCE, lambda a: latency[str(a)], 3, measure)  # noqa: E731
    first = verify([TARGET, in_band])
    searched = []

    def search(job, arguments):
        searched.append(job)
        return {"targets": [{"history": [visit("L5-H256-F512-A8-Q256", 0.93, 11.0)]}]}

    monkeypatch.setattr("autotinybert.search_stage.run_search_stage", search)
    run = Run(tmp_path, validate_config({"search": {"range_fractions": [0.5]}}, check_paths=False))
    job = SearchJob(command=S.SearchCommand(out=tmp_path / "search"), targets=S.TargetSettings(speedups=[4.0]),
                    search=S.SearchSettings(), proxy=S.ProxySettings(), proxy_data=S.ProxyDataCommand(),
                    tasks=S.TaskDataSettings(), budget=S.FinetuneBudget())
    result = stages._correct(run, tmp_path / "corrected", first, job, verify)
    (again,) = searched
    assert again.command.out == tmp_path / "corrected" / "target-3x" and again.targets.speedups == []
    assert again.targets.target_ms == [pytest.approx(10 / 0.9, abs=0.01)]
    assert again.search.window == (pytest.approx(1 / 1.1, abs=1e-4), 1.0)  # the band, not the first window
    assert [row["arch"] for row in result["targets"]] == ["L5-H256-F512-A8-Q256", "L5-H384-F512-A12-Q384"]
    assert "correction" not in result["targets"][1]
    # A corrected budget no architecture fits keeps the first round (a line says why).
    monkeypatch.setattr("autotinybert.search_stage.run_search_stage",
                        lambda job, arguments: (_ for _ in ()).throw(UserError("no architecture in the window")))
    assert stages._correct(run, tmp_path / "corrected", first, job, verify)["targets"] == first["targets"]


def test_targets_share_one_side_by_side_run():
    second = {"target": "2x", "target_ms": 15.0, "visits": [visit("L5-H384-F512-A12-Q384", 0.95, 14.5)]}
    measure = scripted({"L4-H256-F512-A8-Q256": 0.3, "L5-H384-F512-A12-Q384": 0.45})
    result = verify_targets([TARGET, second], REFERENCE, lambda arch: REFERENCE_MS, 1, measure)
    assert measure.calls == [(["L4-H256-F512-A8-Q256", "L5-H384-F512-A12-Q384"], REFERENCE)]
    assert [t["met"] for t in result["targets"]] == [True, True]
    assert result["reference"] == {"arch": REFERENCE, "predicted_ms": REFERENCE_MS, "measured_ms": 31.0}


@pytest.mark.filterwarnings("ignore:.*noisier than")  # a busy machine may warn; the order holds anyway
def test_side_by_side_timing_orders_a_tiny_model_below_its_reference():
    from autotinybert.latency import LatencySettings

    settings = LatencySettings(seq_len=16, vocab_size=100, warmup=1, repeats=3, max_repeats=6)
    ratios, reference_ms = measure_against(settings)(["L1-H32-F64-A2-Q32"], "L4-H256-F1024-A4-Q256")
    assert 0 < ratios["L1-H32-F64-A2-Q32"] < 0.5 and reference_ms > 0


# --- the form that ships ------------------------------------------------------------------------------
FORMS = {"torch": 10.0, "onnxruntime-opt": 7.0, "onnxruntime-opt-int8": 4.0}


def test_int8_ships_when_its_score_is_within_the_tolerance():
    scores = {"torch": 90.0, "onnxruntime-opt": 90.0, "onnxruntime-opt-int8": 89.6}
    assert choose_form(FORMS, scores, 0.5)["form"] == "onnxruntime-opt-int8"


def test_int8_that_loses_more_than_the_tolerance_gives_way_to_the_fastest_fp32_form():
    scores = {"torch": 90.0, "onnxruntime-opt": 90.0, "onnxruntime-opt-int8": 89.4}
    choice = choose_form(FORMS, scores, 0.5)
    assert choice["form"] == "onnxruntime-opt" and "onnxruntime-opt-int8" in choice["reason"]
    assert choose_form(FORMS, scores, 0.6)["form"] == "onnxruntime-opt-int8"


def test_an_unscored_int8_form_never_ships_and_fp32_wins_when_it_is_faster():
    assert choose_form(FORMS, {}, 0.5)["form"] == "onnxruntime-opt"
    slow_int8 = {**FORMS, "onnxruntime-opt-int8": 8.0}  # small models: int8 can be slower
    scores = {"torch": 90.0, "onnxruntime-opt": 90.0, "onnxruntime-opt-int8": 90.0}
    assert choose_form(slow_int8, scores, 0.5)["form"] == "onnxruntime-opt"


# --- the form the search times (develop's latency.form auto) ------------------------------------
FORM_PREDICTORS = {"torch": 10.0, "onnxruntime-opt": 8.0, "onnxruntime-opt-int8": 5.0}  # the largest, predicted ms


@pytest.mark.parametrize("route_scores, expected", [
    (None, "onnxruntime-opt"),  # no task model before the search: int8 unscored, never chosen
    ({"torch": 90.0, "onnxruntime-opt": 90.0, "onnxruntime-opt-int8": 89.6}, "onnxruntime-opt-int8"),  # within 0.5
    ({"torch": 90.0, "onnxruntime-opt": 90.0, "onnxruntime-opt-int8": 89.4}, "onnxruntime-opt"),  # lost more
])
def test_the_searched_form_is_the_fastest_whose_teacher_score_holds(tmp_path, monkeypatch, route_scores, expected):
    from autotinybert.develop import Run, validate_config
    from autotinybert.develop import stages

    class Predictor:
        def __init__(self, form):
            self.form = form

        def predict(self, arch):
            assert str(arch) == REFERENCE  # the forms are compared on the largest architecture
            return FORM_PREDICTORS[self.form]

    run = Run(tmp_path, validate_config({"search": {"range_fractions": [0.5]}}, check_paths=False))
    run.outputs["latency"] = {"predictors": {form: form for form in FORM_PREDICTORS}}
    monkeypatch.setattr("autotinybert.latency.LatencyPredictor.load", lambda path, **_: Predictor(path))
    monkeypatch.setattr(stages, "supernet_space", lambda _: type("Space", (), {"largest": lambda self: REFERENCE})())
    monkeypatch.setattr(stages, "task_route", lambda _: route_scores is not None)
    monkeypatch.setattr(stages, "_teacher_form_scores", lambda *_: route_scores)
    choice = stages._choose_searched_form(run, tmp_path / "form.json", tmp_path)
    assert choice["form"] == expected
    assert choice["reference_ms"] == FORM_PREDICTORS and choice["scores"] == (route_scores or {})
    if route_scores is None:
        assert "onnxruntime-opt-int8 (not scored)" in choice["reason"]
