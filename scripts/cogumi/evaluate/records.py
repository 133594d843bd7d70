"""Types shared by the eval data loaders, the judges and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    task: "math" or "code". prompt: the user message sent through the chat template.
    math: `answer` is the gold final answer (already extracted, e.g. from the last \\boxed{} of the solution).
    code: `tests` is Python test code run after the program; `entry_point` the function under test (HumanEval),
    `reference` the canonical solution when the source has one.
    """

    task: str
    id: str
    prompt: str
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    reference: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The result record of judging one output: never an exception across a pool."""

    passed: bool
    reason: str  # "passed (...)", "wrong answer (...)", "no answer", "failed: AssertionError", "judge_error: ..."
    extracted: str | None = None  # the answer or program that was judged
    # The judge could not decide (its worker died or timed out, its parser failed): not a wrong answer; pairing
    # leaves the problem out of win/tie/loss and counts it (ISSUES_LOG B11).
    judge_error: bool = False
