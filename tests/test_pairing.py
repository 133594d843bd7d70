"""Pairing, percentages, exact McNemar and gates on hand-computed cases."""

import math

import pytest

from cogumi.core.errors import UserError
from cogumi.evaluate.pairing import (
    check_gates,
    describe_gate,
    evaluate_gates,
    mcnemar_exact,
    outcome,
    regression_p,
    summarize,
    unreachable,
)


def test_outcome_of_each_verdict_pair():
    assert outcome(True, False) == "win"
    assert outcome(False, True) == "loss"
    assert outcome(True, True) == "tie_right"
    assert outcome(False, False) == "tie_wrong"


def test_mcnemar_hand_computed():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096 = 0.03857
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_exact(10, 2) == 2 * 79 / 4096
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided: symmetric
    assert mcnemar_exact(7, 7) == 1.0  # b = c: capped at 1
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    assert mcnemar_exact(5, 0) == 2 / 32  # 0.0625: five wins in five are not yet significant at 5 %
    assert mcnemar_exact(6, 0) == 2 / 64


def test_mcnemar_large_counts_stay_finite():
    # 2^1200 overflows a float: the integer arithmetic must not.
    p = mcnemar_exact(500, 700)
    assert 0 < p < 1e-6 and math.isfinite(p)
    assert mcnemar_exact(600, 600) == 1.0


def test_regression_p_is_the_one_sided_tail_against_the_candidate():
    # 2 wins, 10 losses: P(X >= 10), X ~ Bin(12, 1/2) = (C(12,10) + C(12,11) + C(12,12)) / 4096 = 79 / 4096.
    assert regression_p(2, 10) == 79 / 4096
    assert regression_p(10, 2) == 1 - 79 / 4096 + math.comb(12, 2) / 4096  # P(X >= 2): near 1 when wins lead
    assert regression_p(0, 0) == 1.0 and regression_p(7, 7) > 0.5
    assert regression_p(0, 5) == 1 / 32  # five losses in five: significant one-sided, unlike two-sided p = 1/16
    assert 0 < regression_p(20, 340) < 1e-60
    with pytest.raises(ValueError):
        regression_p(-1, 3)


def test_p_gates_are_probabilities():
    with pytest.raises(UserError, match="regression_p_min must be within 0..1"):
        check_gates({"math": {"regression_p_min": 5}}, ["math"])
    with pytest.raises(UserError, match="unknown gate 'regression_p'") as err:
        check_gates({"math": {"regression_p": 0.05}}, ["math"])
    assert "did you mean 'regression_p_min'" in err.value.fix


def test_summarize_counts_and_percentages():
    outcomes = ["win"] * 3 + ["tie_right"] * 30 + ["tie_wrong"] * 5 + ["loss"] * 12
    s = summarize(outcomes)
    assert s["n"] == 50
    assert s["counts"] == {"win": 3, "tie_right": 30, "tie_wrong": 5, "loss": 12, "tie": 35}
    assert s["pct"] == {"win": 6.0, "tie": 70.0, "tie_right": 60.0, "tie_wrong": 10.0, "loss": 24.0}
    assert s["candidate_accuracy"] == 66.0  # wins + both right
    assert s["baseline_accuracy"] == 84.0  # losses + both right
    assert s["mcnemar_p"] == mcnemar_exact(3, 12)


def test_summarize_empty_and_unknown():
    assert summarize([])["pct"]["win"] == 0.0
    with pytest.raises(ValueError):
        summarize(["draw"])


ORIGIN_GATES = {"math": {"win_min": 6, "tie_min": 70}, "code": {"win_min": 48, "tie_min": 20}}


def test_origin_expectation_passes_at_the_boundary():
    # Exactly the origin project's expectation: 6 % / 70 % on MATH, 48 % / 20 % on CODE (percent compare exact).
    summary = {
        "math": summarize(["win"] * 3 + ["tie_right"] * 30 + ["tie_wrong"] * 5 + ["loss"] * 12),
        "code": summarize(["win"] * 12 + ["tie_right"] * 5 + ["loss"] * 8),
    }
    results = evaluate_gates(summary, check_gates(ORIGIN_GATES, ["math", "code"]))
    assert [(r.task, r.gate, r.value, r.limit, r.passed) for r in results] == [
        ("math", "win_min", 6.0, 6.0, True), ("math", "tie_min", 70.0, 70.0, True),
        ("code", "win_min", 48.0, 48.0, True), ("code", "tie_min", 20.0, 20.0, True),
    ]


def test_origin_incident_fails_the_gates():
    # ISSUES_LOG.origin: the corrupted 4-bit merge gave MATH 4 % wins, 28 % ties; CODE 12 % wins, 0 % ties.
    summary = {
        "math": summarize(["win"] * 2 + ["tie_right"] * 10 + ["tie_wrong"] * 4 + ["loss"] * 34),
        "code": summarize(["win"] * 3 + ["loss"] * 22),
    }
    results = evaluate_gates(summary, check_gates(ORIGIN_GATES, ["math", "code"]))
    assert not any(r.passed for r in results)
    assert describe_gate(results[0]) == "math win_min: 4 % < 6 % FAIL"
    assert describe_gate(results[1]) == "math tie_min: 28 % < 70 % FAIL"


def test_max_gates_p_max_and_n_min():
    summary = {"math": summarize(["win"] * 10 + ["loss"] * 2 + ["tie_wrong"] * 8)}  # 50 % win, 10 % loss
    gates = check_gates({"math": {"loss_max": 10, "win_max": 49.9, "p_max": 0.05, "n_min": 21}}, ["math"])
    by_gate = {r.gate: r for r in evaluate_gates(summary, gates)}
    assert by_gate["loss_max"].passed  # 10 <= 10
    assert not by_gate["win_max"].passed
    assert by_gate["p_max"].passed and by_gate["p_max"].value == pytest.approx(0.0386, abs=5e-5)
    assert not by_gate["n_min"].passed and by_gate["n_min"].value == 20
    assert describe_gate(by_gate["p_max"]) == "math p_max: 0.03857 <= 0.05 pass"


def test_gate_on_a_task_not_run_fails():
    results = evaluate_gates({"math": summarize(["win"])}, check_gates(ORIGIN_GATES, ["math"]))
    code = [r for r in results if r.task == "code"]
    assert code and all(not r.passed and r.value is None for r in code)
    assert "not run" in describe_gate(code[0])


@pytest.mark.parametrize("gates, message", [
    ({"maths": {"win_min": 6}}, "unknown task 'maths'"),
    ({"math": {"wins_min": 6}}, "unknown gate 'wins_min'"),
    ({"math": {"win_at_least": 6}}, "unknown gate"),
    ({"math": {"win_min": "6%"}}, "must be a number"),
    ({"math": {"win_min": 600}}, "percentage (0-100)"),
    ({"math": {"p_max": 5}}, "p_max must be within 0..1"),
    ({"math": [6, 70]}, "must be a mapping"),
    ({"math": {"win_min": 20, "win_max": 10}}, "win_min 20 is above win_max 10"),
    ({"code": {"win_min": 48, "tie_min": 40, "loss_min": 20}}, "more than all problems"),
])
def test_bad_gates_are_user_errors(gates, message):
    with pytest.raises(UserError) as err:
        check_gates(gates, ["math", "code"])
    assert message in err.value.what


def test_bad_gate_names_the_closest_key():
    with pytest.raises(UserError) as err:
        check_gates({"math": {"wins_min": 6}}, ["math"])
    assert "win_min" in err.value.fix and "math.wins_min" in err.value.where
    with pytest.raises(UserError) as err:
        check_gates({}, ["math", "reasoning"])
    assert "reasoning" in err.value.what


def test_win_gate_above_what_the_baseline_leaves_is_flagged():
    # A baseline right on 72 % of problems (Llama-3.1-8B-Instruct reports 72.6 % on HumanEval) leaves at most
    # 28 % to win: a 48 % win gate fails for every candidate, and the report says so instead of blaming the model.
    summary = summarize(["tie_right"] * 72 + ["win"] * 28)
    results = evaluate_gates({"code": summary}, check_gates({"code": {"win_min": 48, "tie_min": 20}}, ["code"]))
    win, tie = results
    assert not win.passed and tie.passed
    assert unreachable(win, summary) == ("unreachable: the baseline is right on 72.0 % of code problems, "
                                         "so no candidate can win more than 28.0 %")
    assert unreachable(tie, summary) is None
    reachable = summarize(["tie_right"] * 40 + ["tie_wrong"] * 60)
    assert unreachable(evaluate_gates({"code": reachable}, {"code": {"win_min": 48.0}})[0], reachable) is None


def test_judge_errors_are_left_out_counted_and_gated():
    from cogumi.evaluate.pairing import JUDGE_ERROR, JUDGE_ERROR_MAX_PCT

    assert outcome(True, False, judge_error=True) == JUDGE_ERROR
    s = summarize(["win"] * 6 + ["tie_right"] * 90 + ["loss"] * 1 + [JUDGE_ERROR] * 3)
    assert s["n"] == 97 and s["problems"] == 100 and s["judge_errors"] == 3 and s["judge_error_pct"] == 3.0
    assert s["counts"]["win"] == 6 and abs(s["pct"]["win"] - 600 / 97) < 1e-9  # percentages of judged pairs only
    results = evaluate_gates({"math": s}, {"math": {"win_min": 6}})
    assert [(r.gate, r.passed) for r in results] == [("win_min", True), ("judge_error_max", False)]
    assert results[1].limit == JUDGE_ERROR_MAX_PCT
    relaxed = evaluate_gates({"math": s}, check_gates({"math": {"judge_error_max": 5}}, ["math"]))
    assert [(r.gate, r.passed) for r in relaxed] == [("judge_error_max", True)]
    clean = evaluate_gates({"math": summarize(["win"] * 10)}, {"math": {"win_min": 6}})
    assert [r.gate for r in clean] == ["win_min"]  # no judge errors: the gate list is as configured
