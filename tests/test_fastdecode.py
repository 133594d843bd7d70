"""The fast decoding path (static cache, finished rows dropped) gives exactly the simple path's greedy tokens.

On CPU the same loop runs without CUDA graphs; the graphs replay the same eager kernels, and the 8B-shape check on
a GPU is `make bench-validate` (docs/PERFORMANCE.md)."""

from __future__ import annotations

from collections import Counter

import pytest

from cogumi.evaluate import fastdecode
from cogumi.evaluate.generate import generate, load_model

PROMPTS = ["What is 2 + 2?", "Write a function.", "Say hi", "def add(a, b):", "Name a color.", "Count to five",
           "x", "Explain recursion in one long sentence please, with an example."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def test_fast_path_tokens_equal_the_simple_path_while_rows_finish_at_different_steps(loaded):
    simple = generate(loaded, PROMPTS, max_new_tokens=24, batch_size=8, fast=False)
    # Make rows stop at different steps: add a token that some answers produce early and others never.
    tokens = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in simple.texts]
    common = Counter(t for row in tokens for t in set(row[2:])).most_common()
    loaded.stop_ids = [*loaded.stop_ids, next(t for t, n in common if 1 < n < len(PROMPTS) - 1)]
    simple = generate(loaded, PROMPTS, max_new_tokens=24, batch_size=8, fast=False)
    fast = generate(loaded, PROMPTS, max_new_tokens=24, batch_size=8, fast=True, fast_batch=8)
    assert fast.texts == simple.texts
    assert fast.new_tokens == simple.new_tokens
    lengths = {len(t) for t in fast.texts}
    assert len(lengths) > 2, "the rows must finish at different steps for the shrinking to be exercised"
    # odd batches (spare rows) and a reused decoder give the same tokens again
    again = generate(loaded, PROMPTS, max_new_tokens=24, batch_size=8, fast=True, fast_batch=3)
    assert again.texts == simple.texts and again.path == "static"


def test_cache_sizes_halve_down_to_one():
    decoder = fastdecode.Decoder(batch=64, max_len=128)
    assert [decoder.size_for(n) for n in (64, 33, 32, 17, 9, 5, 3, 2, 1)] == [64, 64, 32, 32, 16, 8, 4, 2, 1]
    assert fastdecode.run_length([10, 70], 100) == 192


def test_progress_counts_every_row_once_as_it_finishes(loaded):
    import torch

    tok = loaded.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS[:5]]
    enc = tok(chats, add_special_tokens=False, padding=True, return_tensors="pt")
    calls = []
    decoder = fastdecode.Decoder(batch=8, max_len=fastdecode.run_length([enc["input_ids"].shape[1]], 12))
    answers = fastdecode.decode_batch(loaded.model, decoder, enc["input_ids"], enc["attention_mask"], 12,
                                      loaded.stop_ids, on_step=lambda live, done: calls.append((live, done)))
    assert len(answers) == 5 and all(0 < len(a) <= 12 for a in answers)
    assert sum(done for _, done in calls) == 5  # each row counted once, when it stops (or at the cut)
    assert len(calls) > 2 and torch.is_tensor(enc["input_ids"])  # progress moved during the batch, not only after
