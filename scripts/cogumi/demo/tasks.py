"""The demo's synthetic tasks: MATH-style (answer in \\boxed{}) and CODE-style (checked by running tests).

Each task is a rule the tiny model can learn from a few hundred examples and apply to numbers it never saw:
the held-out split shares no prompt with the training split, so a win on it is generalisation, not recall.
The shipped files in data/demo/ are this module's output (a test checks they match).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cogumi.core.paths import DATA_DIR

SYSTEM = "You are a careful assistant. Put a final math answer in \\boxed{}; write code in a python block."


def math_problem(kind: int, n: int, m: int) -> tuple[str, str, str]:
    """(prompt, assistant answer, gold) for one MATH-style problem."""
    if kind == 0:
        a, b = 10 * n, m  # tens plus units: the sum is written by placing digits
        return f"What is {a} + {b}?", f"Add the units to the tens: \\boxed{{{a + b}}}.", str(a + b)
    return f"What is {n} times 10?", f"Multiplying by ten appends a zero: \\boxed{{{n * 10}}}.", str(n * 10)


def code_problem(kind: int, k: int) -> tuple[str, str, str, str]:
    """(prompt, assistant answer, tests, entry point) for one CODE-style problem."""
    name, op, verb = (f"add_{k}", "+", "plus") if kind == 0 else (f"times_{k}", "*", "times")
    prompt = f"Write a Python function {name}(x) that returns x {verb} {k}."
    answer = f"```python\ndef {name}(x):\n    return x {op} {k}\n```"
    tests = "\n".join(f"assert {name}({x}) == {x} {op} {k}" for x in (0, 3, -7, 12))
    return prompt, answer, tests, name


def _math_space() -> list[tuple[int, int, int]]:
    return [(0, n, m) for n in range(1, 100) for m in range(1, 10)] + [(1, n, 0) for n in range(1, 1000)]


def _code_space() -> list[tuple[int, int]]:
    return [(kind, k) for kind in (0, 1) for k in range(1, 1000)]


def build(train_per_task: int = 600, test_per_task: int = 40, seed: int = 1234) -> dict[str, list[dict]]:
    """Disjoint train/test splits; train rows are chat `messages`, test rows the benchmark's JSONL schema."""
    rng = random.Random(seed)
    math_items = rng.sample(_math_space(), train_per_task + test_per_task)
    code_items = rng.sample(_code_space(), train_per_task + test_per_task)
    train, math_test, code_test = [], [], []
    for i, item in enumerate(math_items):
        prompt, answer, gold = math_problem(*item)
        if i < test_per_task:
            math_test.append({"task": "math", "id": f"demo-math-{i}", "prompt": prompt, "answer": gold})
        else:
            train.append(_chat(prompt, answer, with_system=i % 2 == 0))
    for i, item in enumerate(code_items):
        prompt, answer, tests, entry = code_problem(*item)
        if i < test_per_task:
            code_test.append({"task": "code", "id": f"demo-code-{i}", "prompt": prompt, "tests": tests,
                              "entry_point": entry})
        else:
            train.append(_chat(prompt, answer, with_system=i % 2 == 0))
    rng.shuffle(train)
    return {"train.jsonl": train, "math_test.jsonl": math_test, "code_test.jsonl": code_test}


def _chat(prompt: str, answer: str, *, with_system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if with_system else []
    return {"messages": messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def corpus(rows: list[dict]) -> list[str]:
    """Texts to train the demo tokenizer on."""
    return [m["content"] for row in rows for m in row["messages"]]


def render(files: dict[str, list[dict]]) -> dict[str, str]:
    return {name: "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows) for name, rows in files.items()}


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in render(build()).items():
        (folder / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write(DATA_DIR / "demo")
