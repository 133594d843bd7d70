"""Pull the final answer out of a model's MATH output (the judge's first half; `judge_math` compares it).

In order; the first that finds something wins:
  1. "several boxes": where the question asks for all solutions/roots/values, several boxes close together at
                      the end (`\\boxed{2}, \\boxed{3}`) are one list answer `2, 3`;
  2. "boxed":         the content of the LAST `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` (nested braces handled);
  3. "#### marker":   GSM8K's `#### 18`, at the start of a line; a note after the number is dropped (the last
                      marker wins over any answer phrase: the marker ends the solution);
  4. "answer phrase": the LAST of "final answer is X", "Final Answer: X", "answer is X", "Answer: X" in the text
                      (markdown emphasis around the label or the answer dropped: `**Answer:** 18`, `is **18**.`;
                      Minerva's "Final Answer: The final answer is X. I hope it is correct." included; a number
                      followed by a unit or currency phrase keeps the number: `$18 per day` -> `18`);
  5. "last number":   the last number in the text, only when the output ended on its own: an output cut off at
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


def boxed_spans(text: str | None) -> list[tuple[str, int, int]]:
    """(content, start, end) of every complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in `text`, in order."""
    out = []
    for match in _BOX.finditer(text or ""):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = braced(text, i)
            if group is not None:
                out.append((group[0].strip(), match.start(), group[1]))
            continue
        if i > match.end():  # "\boxed 5$": the argument runs to the next "$", newline or the end
            rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0]
            if rest.strip():
                out.append((rest.strip().rstrip("."), match.start(), i + len(rest)))
    return [span for span in out if span[0]]


def last_boxed(text: str | None) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`) in `text`; None if there is none.

    Nested braces are matched; an unclosed last box falls back to the previous complete one.
    """
    spans = boxed_spans(text)
    return spans[-1][0] if spans else None


# The question wants every solution: "find all roots", "all real values of x", "separated by commas"
_ASKS_FOR_ALL = re.compile(r"\ball\b[^.?$]{0,40}?\b(?:roots?|solutions?|values?|zeros?|numbers?|integers?|pairs?)\b"
                           r"|\ball\s+(?:real\s+|complex\s+)?[a-z]\b|separated\s+by\s+commas|comma[- ]separated", re.I)
# ... unless it asks for one number made of them: "the sum of all solutions", "how many values"
_ONE_VALUE_OF_ALL = re.compile(r"\b(?:sum|product|number|average|mean|total|count|median|least|greatest|largest|"
                               r"smallest)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+of\s+)?all\b|\bhow\s+many\b", re.I)
_LIST_WANTED = re.compile(r"separated\s+by\s+commas|comma[- ]separated", re.I)
_BOX_GAP = 100  # boxes at most this many characters apart, at the end of the output, are one answer


def asks_for_all(question: str | None) -> bool:
    """The question wants every solution as the answer (not their sum or count)."""
    if not question or not _ASKS_FOR_ALL.search(question):
        return False
    return bool(_LIST_WANTED.search(question)) or not _ONE_VALUE_OF_ALL.search(question)


def several_boxed(text: str, question: str | None) -> str | None:
    """`\\boxed{2} and \\boxed{3}` -> `2, 3` when the question asks for all solutions and the output ends on
    several boxes close together (a box further up is working, not the answer); None otherwise."""
    if not asks_for_all(question):
        return None
    spans = boxed_spans(text)
    run = spans[-1:]
    for span in reversed(spans[:-1]):
        if run[0][1] - span[2] > _BOX_GAP:
            break
        run.insert(0, span)
    answers = list(dict.fromkeys(content for content, _, _ in run))  # the same root boxed twice is one root
    return ", ".join(answers) if len(answers) > 1 else None


# One pattern for every answer phrase, so that the LAST one in the text wins whichever wording it uses. The
# label may sit in markdown emphasis or a heading: "**Answer:** 18", "## Final Answer: 18", "*answer is* 18".
_PHRASE = re.compile(
    r"(?:final\s+answer\s+is|final\s+answer\s*[*_]*\s*:|answer\s+is|(?:^|(?<=\n))[ \t#>*_-]*answer\s*[*_]*\s*:)"
    r"[ \t]*[*_]*[ \t]*:?", re.I)
# GSM8K's final-answer marker "#### 18", often with a note after it ("#### 18 (she keeps 2)", "#### 18\nNote: ...").
# A markdown heading ("#### Step 2") starts with a word, so it is not one.
_MARKER = re.compile(r"(?:^|(?<=\n))[ \t]*####[ \t]*:?[ \t]*(?=[-+$\\(.\d*])")
_LEADING_NUMBER = re.compile(r"[*_]*(\\?\$?\s*-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?(?:\s*\\?%)?)"
                             r"[*_]*(?:[\s.,;:(]|$)")
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


def extract_answer_with_source(text: str | None, *, hit_token_limit: bool = False,
                               question: str | None = None) -> tuple[str | None, str]:
    """(answer, source) where source is "boxed", "several boxes", "#### marker", "answer phrase", "last number"
    or "none".

    hit_token_limit: the output was cut off at max_new_tokens; then the last-number fallback is not used.
    question: the problem's text, when known (several boxes are one answer only where it asks for all solutions).
    """
    if not text:
        return None, "none"
    several = several_boxed(text, question)
    if several:
        return several, "several boxes"
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    for match in reversed(list(_MARKER.finditer(text))):  # the marker ends a GSM8K solution: it beats phrases
        line = text[match.end():].split("\n")[0]
        number = _LEADING_NUMBER.match(line)
        ans = _clean_phrase(number.group(1) if number else line)
        if ans:
            return ans, "#### marker"
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


def extract_answer(text: str | None, question: str | None = None) -> str | None:
    """The final answer in a model's output (see the module docstring for the order of fallbacks)."""
    return extract_answer_with_source(text, question=question)[0]
