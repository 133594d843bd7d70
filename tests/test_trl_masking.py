"""Our loss mask against trl's, an independent implementation of the same rule.

cogumi.train.data labels assistant turns by the chat template's character spans; trl 0.9.6's
DataCollatorForCompletionOnlyLM labels every token after an assistant header up to the next user header, by
token-id search. Two methods, one intended mask: wherever they disagree, one of them trains on the prompt or drops
part of an answer. trl is locked for this check (requirements/base.in says why).
"""

from __future__ import annotations

import pytest

from cogumi.train.data import DataStats, encode_rows

trl = pytest.importorskip("trl")

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "Now twice, please."}, {"role": "assistant", "content": "hi hi"},
     {"role": "user", "content": "And the sum of 12 and 30?"}, {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b\n"}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trl_labels(tokenizer, ids: list[int]) -> list[int]:
    # Header ids as they appear inside a rendered conversation (the template's specials tokenize alone).
    response = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    instruction = tokenizer.encode(USER_HEADER, add_special_tokens=False)
    collator = trl.DataCollatorForCompletionOnlyLM(response_template=response, instruction_template=instruction,
                                                   tokenizer=tokenizer)
    return collator.torch_call([{"input_ids": ids}])["labels"][0].tolist()


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_our_mask_equals_trls(tokenizer, index):
    rows = [(f"chat {index}", {"messages": CONVERSATIONS[index]})]
    [example] = encode_rows(tokenizer, rows, max_seq_len=4096, stats=DataStats(source="test"))
    ours = example.labels
    theirs = trl_labels(tokenizer, example.input_ids)
    assert sum(label != -100 for label in ours) > 0
    differ = [k for k, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not differ, [(k, tokenizer.decode([example.input_ids[k]]), ours[k], theirs[k]) for k in differ]
