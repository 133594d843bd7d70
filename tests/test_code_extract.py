"""Which code block of an answer is the program (ISSUES_LOG B64): the one that defines the entry point."""

from __future__ import annotations

from cogumi.evaluate.records import Problem
from cogumi.judge.code_judge import extract_program, judge_code, pick_block

SOLUTION = "def double(x):\n    return x * 2\n"
EXAMPLE = "print(double(3))  # 6\nprint(double(-1))\n"
ANSWER = (f"Here is the function:\n```python\n{SOLUTION}```\n\nExample usage:\n```python\n{EXAMPLE}```\n"
          "It doubles its argument.")
PROBLEM = Problem(task="code", id="double", prompt="", tests="assert double(2) == 4\n", entry_point="double")


def test_the_block_that_defines_the_entry_point_wins_over_a_later_example_block():
    assert judge_code(ANSWER, PROBLEM).reason == "passed"
    assert pick_block(ANSWER, "double") == SOLUTION


def test_without_an_entry_point_the_last_block_that_defines_a_function_wins():
    assert pick_block(ANSWER) == SOLUTION
    assert pick_block(f"```python\n{EXAMPLE}```") == EXAMPLE  # no block defines anything: the last one


def test_a_later_block_that_redefines_the_entry_point_is_the_program():
    fixed = SOLUTION.replace("x * 2", "x + x")
    text = f"```python\n{SOLUTION}```\nBetter:\n```python\n{fixed}```\n```python\n{EXAMPLE}```"
    assert pick_block(text, "double") == fixed


def test_humaneval_header_with_a_defining_block_before_an_example():
    problem = Problem(task="code", id="he", prompt="", tests="assert double(2) == 4\n", entry_point="double",
                      meta={"code_prompt": 'def double(x):\n    """Twice x."""\n'})
    program = extract_program(ANSWER, problem)
    assert program.count("def double(") == 2 and "print(double(3))" not in program
