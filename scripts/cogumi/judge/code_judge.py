"""The code judge: the program in a model's output, run against a problem's tests in the sandbox."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from cogumi.evaluate.records import Problem, Verdict
from cogumi.judge.sandbox import require_containment, run_program

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def _defines(code: str, name: str) -> bool:
    """`code` defines a function `name` (a regex: `\\w+` is any function)."""
    return bool(re.search(rf"^\s*(?:async\s+)?def\s+{name}\s*\(", code, re.M))


def pick_block(text: str, entry_point: str | None = None) -> str:
    """The code block that holds the solution: the last block that defines the entry point (any function when
    the problem names none), else the last ```python block, else the last ``` block, else the raw text. A solution
    is often followed by an "Example usage" block that only calls it; taking that one fails a right answer
    (ISSUES_LOG B64)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")] or [body for _, body in blocks]
    defining = [body for _, body in blocks
                if (_defines(body, re.escape(entry_point)) if entry_point else _defines(body, r"\w+"))]
    if defining:
        return defining[-1]
    return python[-1] if python else text


def extract_program(output: str | None, problem: Problem | None = None) -> str:
    """The program in a model's output: the block `pick_block` chooses.

    HumanEval: the problem's prompt (imports, helper functions, signature) goes first; a completion that is only
    the body continues the prompt's function, a full function redefines it.
    """
    code = pick_block(output or "", problem.entry_point if problem is not None else None)
    # A fence the regex did not pair (a lone closing ``` after a bare program) is never Python: drop it.
    code = "\n".join(line for line in code.split("\n") if not line.strip().startswith("```")).strip("\n")
    header = (problem.meta.get("code_prompt") if problem is not None else None) or ""
    if header:
        entry = problem.entry_point
        if entry and _defines(code, re.escape(entry)):
            return f"{header}\n\n{code}\n"
        body = code if code.startswith((" ", "\t")) else "\n".join("    " + line for line in code.splitlines())
        return f"{header}{body}\n"
    return code + "\n"


def judge_code(output: str | None, problem: Problem, *, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Extract the program from `output` and run it against `problem.tests` in the sandbox."""
    program = extract_program(output, problem)
    if not program.strip():
        return Verdict(False, "no program", program)
    # HumanEval's prompt runs on the trusted side too: the helpers its tests call (poly, encode_cyclic) stay its own
    return run_program(program, tests=problem.tests or "", timeout_s=timeout_s, memory_mb=memory_mb,
                       entry_point=problem.entry_point, prelude=(problem.meta or {}).get("code_prompt"))


def judge_many(items: Iterable[tuple[str | None, Problem]], workers: int = 2, *, timeout_s: float = 10.0,
               memory_mb: int = 512) -> list[Verdict]:
    """judge_code over (output, problem) pairs with a small pool, in input order; a judge failure becomes a
    judge_error verdict, never an exception across the pool. Raises UserError before any run when the machine
    cannot contain model code and the user did not opt in (sandbox.require_containment)."""
    items = list(items)

    def one(item: tuple[str | None, Problem]) -> Verdict:
        output, problem = item
        try:
            return judge_code(output, problem, timeout_s=timeout_s, memory_mb=memory_mb)
        except Exception as exc:
            log.exception("code judge error on %s", getattr(problem, "id", "?"))
            return Verdict(False, f"judge_error: {type(exc).__name__}: {exc}", None, judge_error=True)

    require_containment()  # probe once before the pool starts; refuse uncontained runs unless opted in
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))
