"""The grader pair table (tests/math_pair_table.py): >= 100 pairs per class, each decided by its rule.

Every class here has pairs the judge before this table got wrong (mixed numbers read as products, anagrams
equal as products of symbols, huge integers and tiny numbers equal within a relative tolerance, percent signs
ignored, `{,}` separators, equations, unions): ISSUES_LOG B10.
"""

from __future__ import annotations

from collections import Counter

from math_pair_table import table

from cogumi.judge.judge_math import compare

PAIRS = table()


def test_every_class_has_at_least_100_pairs_with_both_verdicts():
    sizes = Counter(p.cls for p in PAIRS)
    assert len(sizes) == 14 and min(sizes.values()) >= 100, sizes
    for cls in sizes:
        verdicts = {p.equal for p in PAIRS if p.cls == cls}
        assert verdicts == {True, False}, cls


def test_the_judge_agrees_with_every_pair():
    wrong, undecided = [], []
    for pair in PAIRS:
        result = compare(pair.pred, pair.gold, timeout_s=10.0, question=pair.question)
        if result.equal is None:
            undecided.append((pair, result.cause))
        elif result.equal != pair.equal:
            wrong.append((pair, result.cause))
    assert not undecided, undecided[:10]
    assert not wrong, [f"{p.cls}: {p.pred!r} vs {p.gold!r} should be {p.equal} ({p.rule}); by {c}"
                       for p, c in wrong[:20]]
