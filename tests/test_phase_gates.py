"""Phase 1A's shipped gates on recorded samples: a genuinely better merge passes, the origin incident fails.

The samples are samples.jsonl rows as `make validate` writes them (task, id, prompt, outcome, the two sides'
output / passed / reason / extracted), with the sizes of MATH-500 and HumanEval and the accuracies of
Llama-3.1-8B-Instruct as the baseline (~51 % MATH, ~73 % HumanEval, greedy). The gates come from
configs/phase1a.yaml through the real loader, so a change to the shipped gates is tested here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cogumi.core.config import load_config, phase_config_path
from cogumi.core.fsutil import iter_jsonl
from cogumi.evaluate.pairing import check_gates, evaluate_gates, outcome, summarize, unreachable
from cogumi.evaluate.report import check_reference, render_markdown
from cogumi.evaluate.validate import ValidationPlan, build_report, one_screen

N = {"math": 500, "code": 164}  # MATH-500, HumanEval

# Counts per task: (win, tie_right, tie_wrong, loss).
BETTER = {"math": (45, 230, 200, 25), "code": (13, 112, 32, 7)}  # base 51 % -> 55 %, 72.6 % -> 76.2 %
ABOUT_EQUAL = {"math": (30, 225, 207, 38), "code": (6, 113, 39, 6)}  # 8 more MATH losses: noise, not a regression
# ISSUES_LOG O2: MATH 4 % wins, 28 % ties, 68 % losses; CODE 12 % wins, 0 % ties (so 88 % losses).
CORRUPTED = {"math": (20, 60, 80, 340), "code": (20, 0, 0, 144)}
# Better on MATH, but a merge that broke code: 20 losses against 5 wins on HumanEval.
CODE_BROKEN = {"math": BETTER["math"], "code": (5, 99, 40, 20)}


def math_side(passed: bool, answer: int, rng: random.Random) -> dict:
    given = answer if passed else answer + rng.choice((-2, -1, 1, 3))
    output = (f"We set up the equation and simplify step by step.\n\nThus the value is {given}.\n\n"
              f"The final answer is $\\boxed{{{given}}}$.")
    return {"output": output, "passed": passed, "reason": "passed" if passed else "wrong answer",
            "extracted": str(given)}


def code_side(passed: bool, name: str) -> dict:
    body = "    return sorted(set(xs))" if passed else "    return list(xs)"
    program = f"def {name}(xs):\n{body}\n"
    return {"output": f"```python\n{program}```", "passed": passed,
            "reason": "passed" if passed else "failed: AssertionError", "extracted": program}


def write_recorded_samples(path: Path, counts: dict, seed: int = 0) -> Path:
    """samples.jsonl rows, outcomes shuffled over the problems as a real run interleaves them."""
    rng = random.Random(seed)
    rows = []
    for task, (win, tie_right, tie_wrong, loss) in counts.items():
        assert win + tie_right + tie_wrong + loss == N[task]
        verdicts = [(True, False)] * win + [(True, True)] * tie_right + [(False, False)] * tie_wrong \
            + [(False, True)] * loss
        rng.shuffle(verdicts)
        for i, (cand, base) in enumerate(verdicts):
            if task == "math":
                answer = rng.randint(2, 999)
                prompt = f"Problem {i}: find the value of x. Put your final answer in \\boxed{{}}."
                sides = math_side(cand, answer, rng), math_side(base, answer, rng)
                pid = f"test/algebra/{1000 + i}.json"
            else:
                name = f"unique_{i}"
                prompt = f"def {name}(xs):\n    \"\"\"Return the sorted unique elements of xs.\"\"\"\n"
                sides = code_side(cand, name), code_side(base, name)
                pid = f"HumanEval/{i}"
            rows.append({"task": task, "id": pid, "prompt": prompt, "outcome": outcome(cand, base),
                         "candidate": sides[0], "baseline": sides[1]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def summaries_from_samples(path: Path) -> dict:
    """Per-task summaries recomputed from the recorded verdicts (the recorded outcome must agree with them)."""
    outcomes: dict[str, list[str]] = {}
    for _, row in iter_jsonl(path, fix="one JSON object per line"):
        recomputed = outcome(row["candidate"]["passed"], row["baseline"]["passed"])
        assert recomputed == row["outcome"]
        outcomes.setdefault(row["task"], []).append(recomputed)
    return {task: summarize(items) for task, items in outcomes.items()}


@pytest.fixture(scope="module")
def phase1a():
    config = load_config(phase_config_path("1a"))
    return config, check_gates(config.validate.gates, list(config.validate.tasks))


def gate_verdicts(tmp_path, phase1a, counts) -> dict:
    summaries = summaries_from_samples(write_recorded_samples(tmp_path / "samples.jsonl", counts))
    results = evaluate_gates(summaries, phase1a[1])
    return {task: all(r.passed for r in results if r.task == task) for task in N}


def test_shipped_gates_guard_both_tasks_against_regression_on_the_full_sets(phase1a):
    _, gates = phase1a
    assert set(gates) == {"math", "code"}
    for task, task_gates in gates.items():
        assert task_gates["regression_p_min"] == 0.05
        assert task_gates["n_min"] == N[task]


@pytest.mark.parametrize(("counts", "expected"), [
    (BETTER, {"math": True, "code": True}),
    (ABOUT_EQUAL, {"math": True, "code": True}),
    (CORRUPTED, {"math": False, "code": False}),
    (CODE_BROKEN, {"math": True, "code": False}),
], ids=["better", "about-equal", "origin-corrupted-merge", "code-broken"])
def test_recorded_samples_pass_or_fail_the_shipped_gates(tmp_path, phase1a, counts, expected):
    assert gate_verdicts(tmp_path, phase1a, counts) == expected


def test_the_origin_gates_would_fail_a_genuinely_better_merge_as_unreachable(tmp_path, phase1a):
    summaries = summaries_from_samples(write_recorded_samples(tmp_path / "samples.jsonl", BETTER))
    origin = check_gates({"math": {"win_min": 6, "tie_min": 70}, "code": {"win_min": 48, "tie_min": 20}},
                         ["math", "code"])
    failed = [r for r in evaluate_gates(summaries, origin) if not r.passed]
    assert [(r.task, r.gate) for r in failed] == [("code", "win_min")]
    assert "no candidate can win more than 27.4 %" in unreachable(failed[0], summaries["code"])


def test_report_shows_the_origin_numbers_as_a_reference_not_a_gate(tmp_path, phase1a):
    config, gates = phase1a
    summaries = summaries_from_samples(write_recorded_samples(tmp_path / "samples.jsonl", CORRUPTED))
    for task, summary in summaries.items():
        summary.update(source={"math": "math500", "code": "humaneval"}[task], generation={"candidate": None})
    reference = check_reference(config.validate.reference, ["math", "code"], "phase1a.yaml: validate.reference")
    plan = ValidationPlan("phase1a", tmp_path, "meta-llama/Meta-Llama-3.1-8B-Instruct", False, ["math", "code"], {},
                          gates, None, reference)
    results = evaluate_gates(summaries, gates)
    report = build_report(plan, config, summaries, results)
    assert report["passed"] is False and report["reference"]["math"] == {"win": 6.0, "tie": 70.0, "loss": 24.0}
    markdown = render_markdown(report)
    assert ("Reference, not a gate (origin project's phase 1A expectation (ISSUES_LOG O2)): "
            "win 6 %, tie 70 %, loss 24 %.") in markdown
    assert "| regression_p_min | " in markdown and "**FAIL**" in markdown
    screen = one_screen(report, results, tmp_path / "report.md")
    assert "code regression_p_min: " in screen and "reference, not a gate" in screen


def test_a_reference_is_checked_at_load():
    from cogumi.core.errors import UserError

    with pytest.raises(UserError, match="not a rate in percent"):
        check_reference({"math": {"wins": 6}}, ["math"], "validate.reference")
    with pytest.raises(UserError, match="for a task that runs"):
        check_reference({"gsm8k": {"win": 6}}, ["math"], "validate.reference")
    assert check_reference({}, ["math"], "validate.reference") == {}
