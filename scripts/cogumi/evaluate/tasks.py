"""The task registry: what validation can run. A new task is one entry here (its default source and its judge).

A judge takes the task's problems and one model's outputs and returns one Verdict per problem, in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cogumi.evaluate.records import Problem, Verdict

# Code judging is one sandboxed process per program: use half the cores, leaving the rest to the sandboxes' setup.
JUDGE_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


def judge_math_outputs(problems: list[Problem], outputs: list[str]) -> list[Verdict]:
    from cogumi.evaluate.judge_math import judge_math

    return [judge_math(out, p.answer) for p, out in zip(problems, outputs, strict=True)]


def judge_code_outputs(problems: list[Problem], outputs: list[str]) -> list[Verdict]:
    from cogumi.evaluate.code_judge import judge_many

    return list(judge_many(list(zip(outputs, problems, strict=True)), workers=JUDGE_WORKERS))


@dataclass(frozen=True)
class Task:
    name: str
    default_source: str  # a cogumi.evaluate.sources name, used when validate.data does not name one
    judge: Callable[[list[Problem], list[str]], list[Verdict]]


TASKS = {
    "math": Task("math", "math500", judge_math_outputs),
    "code": Task("code", "humaneval", judge_code_outputs),
}
