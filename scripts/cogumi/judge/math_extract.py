"""Pull the final answer out of a model's MATH output (the judge's first half; `judge_math` compares it).

In order; the first that finds something wins:
  1. "boxed":         the content of the LAST `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` (nested braces handled);
  2. "answer phrase": the LAST of "final answer is X", "Final Answer: X", "answer is X", "Answer: X" in the text
                      (markdown emphasis around the label or the answer dropped: `**Answer:** 18`, `is **18**.`;
                      Minerva's "Final Answer: The final answer is X. I hope it is correct." included; a number
                      followed by a unit or currency phrase keeps the number: `$18 per day` -> `18`);
  3. "last number":   the last number in the text, only when the output ended on its own: an output cut off at
                      the token limit without a box or an answer phrase has no answer (a repetition loop that
                      happens to end on the gold is not a solution; ISSUES_LOG B12).
"""

from __future__ import annotations

import re


def braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == "{" and the index after it; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace (\{ \}) does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str | None) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`) in `text`; None if there is none.

    Nested braces are matched; an unclosed last box falls back to the previous complete one.
    """
    if not text:
        return None
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = braced(text, i)
            if group is not None:
                return group[0].strip()
            continue
        if i > match.end():  # "\boxed 5$": the argument runs to the next "$", newline or the end
            rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
            if rest:
                return rest.rstrip(".")
    return None


# One pattern for every answer phrase, so that the LAST one in the text wins whichever wording it uses. The
# label may sit in markdown emphasis or a heading: "**Answer:** 18", "## Final Answer: 18", "*answer is* 18".
_PHRASE = re.compile(
    r"(?:final\s+answer\s+is|final\s+answer\s*[*_]*\s*:|answer\s+is|(?:^|(?<=\n))[ \t#>*_-]*answer\s*[*_]*\s*:)"
    r"[ \t]*[*_]*[ \t]*:?", re.I)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "$18 per day", "18 dollars", "\$1,250.50 in total", "45 %": a number with currency/units/words around it.
_NUMBER_WITH_WORDS = re.compile(
    r"^(?:\\?\$|USD\s*)?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*(\\?%)?(?:\s*[A-Za-z][A-Za-z .'/-]*)?$")


def _strip_emphasis(ans: str) -> str:
    """`**18**` -> `18`, `__x__` -> `x`, `*18*.` -> `18.`: markdown emphasis is not part of an answer."""
    ans = re.sub(r"\*\*(.+?)\*\*", r"\1", ans)
    ans = re.sub(r"(?<![\w\\])__(.+?)__(?!\w)", r"\1", ans)
    return ans.strip().strip("*").strip()


def _clean_phrase(ans: str) -> str:
    ans = _strip_emphasis(ans)
    # Minerva's format ends with ". I hope it is correct."
    ans = re.split(r"\.\s+I hope it is correct", ans, maxsplit=1, flags=re.I)[0]
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("$") and ans.count("$") >= 2:  # "$\frac{1}{2}$." / "$18$ per day" / "$18 per day, or $20"
        inner = ans[1:ans.index("$", 1)]
        if inner and inner == inner.rstrip():  # a formula ends at its "$"; currency text runs on to a space
            ans = inner
    elif ans.startswith("\\(") and "\\)" in ans:
        ans = ans[2:ans.index("\\)")]
    ans = _strip_emphasis(ans).rstrip(".").strip()
    if "=" in ans:  # "5 + 3 = 8": a worked sum ends on its result (a left side with letters is kept: "x = 8")
        left, right = ans.rsplit("=", 1)
        if re.fullmatch(r"\s*-?[\d,.]+\s*", right) and not re.search(r"[A-Za-z]", left):
            ans = right.strip()
    with_words = _NUMBER_WITH_WORDS.match(ans)
    if with_words and not re.fullmatch(r"-?[\d,.]+", ans):
        ans = with_words.group(1) + ("\\%" if with_words.group(2) else "")
    return ans.strip()


def extract_answer_with_source(text: str | None, *, hit_token_limit: bool = False) -> tuple[str | None, str]:
    """(answer, source) where source is "boxed", "answer phrase", "last number" or "none".

    hit_token_limit: the output was cut off at max_new_tokens; then the last-number fallback is not used.
    """
    if not text:
        return None, "none"
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    for match in reversed(list(_PHRASE.finditer(text))):
        ans = _clean_phrase(text[match.end():].split("\n")[0])
        if ans:
            return ans, "answer phrase"
    if hit_token_limit:
        return None, "none"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last number"
    return None, "none"


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model's output (see the module docstring for the order of fallbacks)."""
    return extract_answer_with_source(text)[0]
