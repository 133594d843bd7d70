"""The task registry: what validation can run. A new task is one entry here (its default source and its judge).

A judge takes the task's problems, one model's outputs and the indices of outputs cut off at max_new_tokens, and
returns one Verdict per problem, in order (a judge that cannot decide says so: Verdict.judge_error).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cogumi.evaluate.records import Problem, Verdict

# Code judging is one sandboxed process per program: use half the cores, leaving the rest to the sandboxes' setup.
JUDGE_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


def judge_math_outputs(problems: list[Problem], outputs: list[str], capped: set[int] = frozenset()) -> list[Verdict]:
    from cogumi.judge.judge_math import judge_math

    return [judge_math(out, p.answer, hit_token_limit=i in capped, question=p.prompt)
            for i, (p, out) in enumerate(zip(problems, outputs, strict=True))]


def judge_code_outputs(problems: list[Problem], outputs: list[str], capped: set[int] = frozenset()) -> list[Verdict]:
    from cogumi.judge.code_judge import judge_many

    return list(judge_many(list(zip(outputs, problems, strict=True)), workers=JUDGE_WORKERS))


@dataclass(frozen=True)
class Task:
    name: str
    default_source: str  # a cogumi.evaluate.sources name, used when validate.data does not name one
    judge: Callable[[list[Problem], list[str], set[int]], list[Verdict]]


TASKS = {
    "math": Task("math", "math500", judge_math_outputs),
    "code": Task("code", "humaneval", judge_code_outputs),
}
