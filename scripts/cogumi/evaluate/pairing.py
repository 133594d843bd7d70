"""Pairing a candidate against a baseline, problem by problem: win/tie/loss, exact McNemar, gates.

Per problem, from the two verdicts: win (candidate right, baseline wrong), loss (the reverse), tie_right (both
right), tie_wrong (both wrong). "tie" is tie_right + tie_wrong, as in the origin project's expectations
("MATH 6 % wins, 70 % ties, 24 % losses"). Percentages are of all paired problems (0-100).

McNemar's test looks only at the discordant pairs (wins b, losses c): under "both models are equally good" each
discordant pair is a fair coin, so the exact two-sided p-value is a binomial tail on b + c, computed with integers.
It is two-sided: a small p says the models differ, not in which direction; read it with win vs loss.
`regression_p` is the one-sided tail in the candidate's disfavour: a small value says the losses are significantly
above the wins, the way the origin project's corrupted merge lost to its base (ISSUES_LOG O2).

A problem where either side's verdict is a judge error (the judge could not decide: its worker died or timed
out, its parser failed) is "judge_error": left out of win/tie/loss and of n, counted apart, and gated by
judge_error_max (percent of all problems; JUDGE_ERROR_MAX_PCT when a gated task had judge errors and its gates
do not set it), so a judge
failure is never read as a wrong answer nor lets a run through unnoticed (ISSUES_LOG B11).
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from typing import NamedTuple

from cogumi.core.errors import UserError
from cogumi.evaluate.tasks import TASKS

OUTCOMES = ("win", "tie_right", "tie_wrong", "loss")
JUDGE_ERROR = "judge_error"
JUDGE_ERROR_MAX_PCT = 2.0  # a larger share of undecided problems makes the comparison itself doubtful
RATE_METRICS = ("win", "tie", "tie_right", "tie_wrong", "loss")  # gated as percentages, 0-100
# Gate keys: <rate>_min / <rate>_max in percent, p_max on the McNemar p-value, regression_p_min on the one-sided
# p-value of "losses above wins" (fails only a significant regression), n_min on the problem count (so a quick
# `--limit` run cannot stamp a model VALIDATED when the config asks for the full set), judge_error_max in percent.
P_GATES = ("p_max", "regression_p_min")
GATE_KEYS = tuple(f"{m}_{bound}" for m in RATE_METRICS for bound in ("min", "max")) + P_GATES + ("n_min",
                                                                                                 "judge_error_max")
# Percentages are computed as 100 * count / n; allow float noise so 3/50 meets "win_min: 6".
EPS = 1e-9


class GateResult(NamedTuple):
    task: str
    gate: str  # a GATE_KEYS name
    value: float | None  # None when the task was not run
    limit: float
    passed: bool


def outcome(candidate_passed: bool, baseline_passed: bool, judge_error: bool = False) -> str:
    if judge_error:
        return JUDGE_ERROR
    if candidate_passed and baseline_passed:
        return "tie_right"
    if candidate_passed:
        return "win"
    if baseline_passed:
        return "loss"
    return "tie_wrong"


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b wins and c losses: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2).

    No discordant pairs (b + c = 0) is no evidence of a difference: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError("counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    # Integer numerator and denominator: Python divides big ints exactly-rounded, so n in the thousands is fine.
    return min(1.0, 2 * tail / 2**n)


def regression_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(X >= losses), X ~ Bin(wins + losses, 1/2).

    Near 1 when wins outnumber losses; small only when losses are significantly above wins.
    """
    if wins < 0 or losses < 0:
        raise ValueError("counts must be non-negative")
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(losses, n + 1)) / 2**n


def summarize(outcomes: list[str]) -> dict:
    """Counts, percentages, accuracies and the McNemar p-value of one task's outcomes; judge errors are counted
    apart (`judge_errors`, `judge_error_pct` of all problems) and left out of n and every other figure."""
    unknown = set(outcomes) - set(OUTCOMES) - {JUDGE_ERROR}
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    errors = sum(1 for o in outcomes if o == JUDGE_ERROR)
    outcomes = [o for o in outcomes if o != JUDGE_ERROR]
    counts = Counter(outcomes)
    n = len(outcomes)
    counts = {name: counts.get(name, 0) for name in OUTCOMES}
    counts["tie"] = counts["tie_right"] + counts["tie_wrong"]

    def pct(k: int) -> float:
        return 100.0 * k / n if n else 0.0

    return {
        "n": n,
        "counts": counts,
        "pct": {name: pct(counts[name]) for name in RATE_METRICS},
        "candidate_accuracy": pct(counts["win"] + counts["tie_right"]),
        "baseline_accuracy": pct(counts["loss"] + counts["tie_right"]),
        "mcnemar_p": mcnemar_exact(counts["win"], counts["loss"]),
        "regression_p": regression_p(counts["win"], counts["loss"]),
        "problems": n + errors,
        "judge_errors": errors,
        "judge_error_pct": 100.0 * errors / (n + errors) if n + errors else 0.0,
    }


def check_gates(gates: dict, tasks: list[str], *, source: str = "validate.gates") -> dict:
    """Validate the `validate.gates` mapping at load time; returns it as {task: {key: float}}.

    Unknown tasks and unknown gate keys are user errors naming the closest valid name. A gate on a known task
    that is not in `tasks` is allowed (it fails as "not run" so a partial run never stamps VALIDATED).
    """
    unknown_tasks = [t for t in tasks if t not in tuple(TASKS)]
    if unknown_tasks:
        raise UserError(f"unknown validate task '{unknown_tasks[0]}'", where=f"{source.rsplit('.', 1)[0]}.tasks",
                        fix=f"tasks are {', '.join(tuple(TASKS))}")
    if not isinstance(gates, dict):
        raise UserError(f"{source} must be a mapping of task -> gates", where=source,
                        fix="e.g. gates: {math: {win_min: 6, tie_min: 70}}")
    checked = {}
    for task, task_gates in gates.items():
        if task not in tuple(TASKS):
            raise UserError(f"gate for unknown task '{task}'", where=f"{source}.{task}",
                            fix=f"gates are keyed by task: {', '.join(TASKS)}{_did_you_mean(task, tuple(TASKS))}")
        if not isinstance(task_gates, dict):
            raise UserError(f"{source}.{task} must be a mapping of gate -> limit", where=f"{source}.{task}",
                            fix="e.g. {win_min: 6, tie_min: 70}")
        checked[task] = {}
        for key, limit in task_gates.items():
            where = f"{source}.{task}.{key}"
            if key not in GATE_KEYS:
                raise UserError(f"unknown gate '{key}'", where=where,
                                fix=f"gates are <win|tie|tie_right|tie_wrong|loss>_<min|max> (percent), p_max, "
                                    f"regression_p_min, n_min, judge_error_max (percent)"
                                    f"{_did_you_mean(key, GATE_KEYS)}")
            if isinstance(limit, bool) or not isinstance(limit, int | float):
                raise UserError(f"gate {task}.{key} must be a number, got {limit!r}", where=where,
                                fix="write percentages as numbers, e.g. win_min: 6 for 6 %")
            if key in P_GATES and not 0 <= limit <= 1:
                raise UserError(f"{key} must be within 0..1, got {limit}", where=where, fix=f"e.g. {key}: 0.05")
            if key == "n_min" and limit < 0:
                raise UserError(f"n_min must be a count >= 0, got {limit}", where=where, fix="e.g. n_min: 500")
            if key not in (*P_GATES, "n_min") and not 0 <= limit <= 100:  # judge_error_max is a percentage too
                raise UserError(f"gate {task}.{key} is a percentage (0-100), got {limit}", where=where,
                                fix="write 6 for 6 %, not 0.06")
            checked[task][key] = float(limit)
        _check_reachable(checked[task], f"{source}.{task}")
    return checked


def _check_reachable(task_gates: dict, where: str) -> None:
    """Gates no result can meet are refused at load, not discovered after an hour of generation."""
    for metric in RATE_METRICS:
        low, high = task_gates.get(f"{metric}_min"), task_gates.get(f"{metric}_max")
        if low is not None and high is not None and low > high:
            raise UserError(f"{metric}_min {low:g} is above {metric}_max {high:g}", where=where,
                            fix=f"lower {metric}_min or raise {metric}_max")
    floor = sum(task_gates.get(f"{m}_min", 0.0) for m in ("win", "tie", "loss"))
    if floor > 100 + EPS:
        raise UserError(f"win_min + tie_min + loss_min is {floor:g} %, more than all problems", where=where,
                        fix="the three minimums must add up to 100 or less")


def unreachable(result: GateResult, summary: dict | None) -> str | None:
    """Why a failed win_min gate could not have passed against this baseline, or None.

    A win needs the baseline to be wrong, so wins <= 100 - baseline accuracy: a gate above that fails for every
    candidate, however good (the gate, the data or the baseline is wrong, not the model).
    """
    if result.passed or result.gate != "win_min" or summary is None:
        return None
    ceiling = 100.0 - summary["baseline_accuracy"]
    if result.limit <= ceiling + EPS:
        return None
    return (f"unreachable: the baseline is right on {summary['baseline_accuracy']:.1f} % of {result.task} problems, "
            f"so no candidate can win more than {ceiling:.1f} %")


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def gate_value(summary: dict, key: str) -> float:
    if key == "p_max":
        return summary["mcnemar_p"]
    if key == "regression_p_min":
        return summary["regression_p"]
    if key == "n_min":
        return float(summary["n"])
    if key == "judge_error_max":
        return summary.get("judge_error_pct", 0.0)
    return summary["pct"][key.rsplit("_", 1)[0]]


def evaluate_gates(summary: dict, gates: dict) -> list[GateResult]:
    """Every gate against the per-task summaries ({task: summarize(...)}); a task not run fails its gates.

    A gated task with judge errors always gets judge_error_max (JUDGE_ERROR_MAX_PCT unless its gates set it)."""
    results = []
    for task, task_gates in gates.items():
        if summary.get(task, {}).get("judge_errors"):
            task_gates = {**task_gates, "judge_error_max": task_gates.get("judge_error_max", JUDGE_ERROR_MAX_PCT)}
        for key, limit in task_gates.items():
            if task not in summary:
                results.append(GateResult(task, key, None, limit, False))
                continue
            value = gate_value(summary[task], key)
            passed = value <= limit + EPS if key.endswith("_max") else value >= limit - EPS
            results.append(GateResult(task, key, value, limit, passed))
    return results


def describe_gate(result: GateResult) -> str:
    """One line: `math win_min: 4.00 % < 6 % FAIL`."""
    unit = "" if result.gate in (*P_GATES, "n_min") else " %"
    if result.value is None:
        return f"{result.task} {result.gate}: task not run (limit {result.limit:g}{unit}) FAIL"
    op = ("<=" if result.passed else ">") if result.gate.endswith("_max") else (">=" if result.passed else "<")
    shown = f"{result.value:.4g}" if result.gate in P_GATES else f"{result.value:.2f}".rstrip("0").rstrip(".")
    verdict = "pass" if result.passed else "FAIL"
    return f"{result.task} {result.gate}: {shown}{unit} {op} {result.limit:g}{unit} {verdict}"
