"""Held-out MATH classes the judge got wrong: answer markers, several boxed roots, and the rules that
read the question (ISSUES_LOG B65-B68). The equivalence rows themselves are in tests/math_pair_table.py."""

from __future__ import annotations

import pytest

from cogumi.evaluate.records import Problem
from cogumi.evaluate.sources import load_task, math_gold, math_prompt
from cogumi.evaluate.tasks import judge_math_outputs
from cogumi.judge.judge_math import extract_answer_with_source, judge_math

ALL_ROOTS = "Find all solutions to $x^2 - 5x + 6 = 0$. Enter all the solutions, separated by commas."
TWO_BOXES = "Factor: $(x-2)(x-3)=0$, so $x = \\boxed{2}$ or $x = \\boxed{3}$."


@pytest.mark.parametrize("text, answer", [
    ("5 + 13 = 18\n#### 18", "18"),
    ("5 + 13 = 18\n#### 18 (she keeps 2 of them for herself)", "18"),
    ("5 + 13 = 18\n#### 18\n\nNote: 3 of the 21 were given away.", "18"),
    ("Total: 1,250 dollars.\n#### $1,250. Note: before the 5 cent fee", "1,250"),
    ("#### 18\nSo the answer is rounded.", "18"),  # the marker ends the solution: a later phrase is a note
    ("#### -3.5", "-3.5"),
])
def test_the_gsm8k_marker_is_the_answer_also_when_a_note_follows(text, answer):
    assert extract_answer_with_source(text) == (answer, "#### marker")


def test_a_markdown_heading_is_not_a_marker():
    assert extract_answer_with_source("#### Step 2\nSo we get 7 apples") == ("7", "last number")


def test_several_boxes_are_one_list_where_the_question_asks_for_all_solutions():
    assert extract_answer_with_source(TWO_BOXES, question=ALL_ROOTS) == ("2, 3", "several boxes")
    assert judge_math(TWO_BOXES, "2, 3", question=ALL_ROOTS).passed
    assert judge_math(TWO_BOXES, "3, 2", question=ALL_ROOTS).passed
    # a question that asks for one value keeps the last box, also one made of all the solutions
    assert extract_answer_with_source(TWO_BOXES, question="What is the larger root?") == ("3", "boxed")
    summed = TWO_BOXES + " Their sum is $\\boxed{5}$."
    assert extract_answer_with_source(summed, question="Find the sum of all solutions of $x^2-5x+6=0$.") == (
        "5", "boxed")
    # a box far up in the working is not part of the answer; the same root boxed twice is one root
    far = "The discriminant is $\\boxed{1}$. " + "Then we factor. " * 10 + TWO_BOXES
    assert extract_answer_with_source(far, question=ALL_ROOTS) == ("2, 3", "several boxes")
    assert extract_answer_with_source("$x=\\boxed{3}$, that is \\boxed{3}", question=ALL_ROOTS) == ("3", "boxed")


def test_validation_hands_the_question_to_the_judge():
    percent = Problem(task="math", id="p", prompt=math_prompt("What percent of 50 is 9?"), answer="18")
    roots = Problem(task="math", id="r", prompt=math_prompt(ALL_ROOTS), answer="2, 3")
    exact = Problem(task="math", id="e", prompt=math_prompt("Write $\\frac{5}{2}$ as a decimal."), answer="2.5")
    verdicts = judge_math_outputs([percent, roots, exact], ["So it is $\\boxed{18\\%}$.", TWO_BOXES,
                                                             "$\\boxed{2.54}$"])
    assert [v.passed for v in verdicts] == [True, True, False], verdicts


def test_a_gold_inequality_is_an_interval_not_a_judge_error():
    right = judge_math("The solutions are $\\boxed{(2, \\infty)}$.", "x > 2")
    assert right.passed and not right.judge_error
    wrong = judge_math("The solutions are $\\boxed{[2, \\infty)}$.", "x > 2")
    assert not wrong.passed and not wrong.judge_error


def test_an_unreadable_gold_falls_back_to_normalized_strings_before_a_judge_error():
    assert judge_math("\\boxed{x \\neq 2}", "x \\ne 2").reason == (
        "passed (normalized strings (the parser cannot read them))")
    assert judge_math("\\boxed{x \\neq 3}", "x \\ne 2").judge_error  # undecided stays undecided


def test_a_math_gold_with_several_boxed_roots_keeps_them_all():
    solution = "We plug both values back in; both work. Therefore, the answers are $\\boxed{-2}$ and $\\boxed{1}$."
    assert math_gold(solution, "Find all solutions to the equation $\\sqrt{3x+6}=x+2$.") == "-2, 1"
    assert math_gold(solution, "What is the larger solution?") == "1"
    golds = {p.id: p.answer for p in load_task("math") if p.id in ("math/algebra/414", "math/precalculus/406")}
    assert golds == {"math/algebra/414": "-2, 1", "math/precalculus/406": "\\frac{\\pi}{4}, \\frac{5\\pi}{4}"}
