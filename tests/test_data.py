"""Data: chat formatting, loss only on assistant tokens, malformed rows, truncation, packing, resumable order."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from cogumi.core.config import DataConfig
from cogumi.core.errors import UserError
from cogumi.train.data import (
    IGNORE_INDEX,
    Batches,
    Collator,
    DataStats,
    Example,
    build_data,
    encode_rows,
    pack,
    read_data,
    read_rows,
)
from cogumi.train.packed_attention import packed_attention, require_packed_attention

MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "The answer is \\boxed{42}."},
    {"role": "user", "content": "And in code?"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def labelled_spans(example: Example, tokenizer) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_labels_decode_to_exactly_the_assistant_turns(tokenizer):
    stats = DataStats("test")
    (example,) = encode_rows(tokenizer, [("row", MULTI_TURN)], 4096, stats)
    # The template trims content; each turn's <|eot_id|> is trained so the model learns to stop.
    want = [m["content"].strip() + "<|eot_id|>" for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert labelled_spans(example, tokenizer) == want
    text = tokenizer.decode(example.input_ids)
    assert text == tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    assert text.count("<|begin_of_text|>") == 1
    assert stats.label_tokens == sum(label != IGNORE_INDEX for label in example.labels)


def test_prompt_response_rows_are_formatted_by_the_template(tokenizer):
    row = {"system": "Be brief.", "prompt": "Say hi.", "response": "hi"}
    (example,) = encode_rows(tokenizer, [("row", row)], 4096, DataStats("test"))
    assert labelled_spans(example, tokenizer) == ["hi<|eot_id|>"]
    text = tokenizer.decode(example.input_ids)
    assert "<|start_header_id|>system<|end_header_id|>\n\nBe brief." in text
    assert "<|start_header_id|>user<|end_header_id|>\n\nSay hi." in text


@pytest.mark.parametrize("line, expect", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role"),
    ('{"prompt": "hi"}', "malformed row"),
    ('[1, 2]', "malformed row"),
])
def test_malformed_row_names_file_and_line(tmp_path, tokenizer, line, expect):
    path = write_jsonl(tmp_path / "train.jsonl", [MULTI_TURN, "", MULTI_TURN, line])
    with pytest.raises(UserError) as err:
        rows, _ = read_rows(str(path))  # JSON errors surface here, shape errors when formatting
        encode_rows(tokenizer, rows, 512, DataStats("t"))
    rendered = err.value.render()
    assert expect in rendered and f"{path}:4" in rendered


def test_missing_local_file_is_a_user_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="not found"):
        read_rows("someone/some-dataset")  # a hub id is only tried while online
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("cogumi.train.rows._read_hub_dataset", lambda *a: pytest.fail("a local path went to the hub"))
    with pytest.raises(UserError, match="not found"):
        read_rows("data/phase9/train.jsonl")  # a repo-relative path is never mistaken for a hub id


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer):
    long_answer = {"messages": [{"role": "user", "content": "count"},
                                {"role": "assistant", "content": " ".join(str(i) for i in range(200))}]}
    long_prompt = {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "ok"}]}
    short = {"prompt": "hi", "response": "hello"}
    stats = DataStats("t")
    examples = encode_rows(tokenizer, [("a", long_answer), ("b", long_prompt), ("c", short)], 64, stats)
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 2)
    assert all(len(ex.input_ids) <= 64 for ex in examples)
    assert "2 truncated, 1 dropped" in stats.describe()


def _examples(tokenizer, n):
    rows = [("r", {"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}." * (1 + i % 3)}) for i in range(n)]
    return encode_rows(tokenizer, rows, 256, DataStats("t"))


def test_packing_never_lets_attention_cross_examples(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    examples = _examples(tokenizer, 6)
    rows = pack(examples, 128)
    assert len(rows) < len(examples) and all(sum(len(e.input_ids) for e in r) <= 128 for r in rows)
    assert sorted(id(e) for r in rows for e in r) == sorted(map(id, examples))  # nothing lost, split or doubled
    batch = Collator(pad_id=tokenizer.pad_token_id, packed=True)(rows)
    assert "attention_mask" not in batch  # no L x L mask leaves the CPU: the packed attention builds what it needs
    for attention in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
        with torch.no_grad(), packed_attention(model, "sdpa_block_mask"):
            packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        with torch.no_grad():  # each example alone, with the model's own attention
            for b, row in enumerate(rows):
                at = 0
                for ex in row:
                    alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
                    torch.testing.assert_close(packed[b, at:at + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-4)
                    at += len(ex.input_ids)
    # Labels keep -100 on padding and on every non-assistant token of the packed row.
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        sum(label != IGNORE_INDEX for label in ex.labels) for ex in examples)
    # Without the packed attention the same batch would attend across examples: the trainer refuses it.
    with pytest.raises(RuntimeError, match="attend across"):
        require_packed_attention(model)


def test_unpacked_batches_pad_right_with_masked_labels(tokenizer):
    examples = _examples(tokenizer, 3)
    batch = Collator(pad_id=tokenizer.pad_token_id, packed=False)(examples)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(ex.input_ids) for ex in examples]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_order_is_seeded_and_the_position_restores(tokenizer):
    examples = _examples(tokenizer, 10)
    collate = Collator(pad_id=tokenizer.pad_token_id, packed=False)

    def take(batches, n):
        return [next(batches)[0]["input_ids"].tolist() for _ in range(n)]

    first = take(Batches(examples, 3, seed=5, collate=collate), 9)  # crosses into the third epoch
    assert first == take(Batches(examples, 3, seed=5, collate=collate), 9)
    assert first != take(Batches(examples, 3, seed=6, collate=collate), 9)
    running = Batches(examples, 3, seed=5, collate=collate)
    take(running, 4)
    state = running.state_dict()
    restored = Batches(examples, 3, seed=5, collate=collate)
    restored.load_state_dict(state)
    assert take(restored, 5) == first[4:]
    with pytest.raises(UserError, match="data position"):
        Batches(examples[:-1], 3, seed=5, collate=collate).load_state_dict(state)


def test_ranks_take_disjoint_micro_batches(tokenizer):
    examples = _examples(tokenizer, 12)
    collate = Collator(pad_id=tokenizer.pad_token_id, packed=False)
    seen = []
    for rank in range(2):
        batches = Batches(examples, 2, seed=0, collate=collate, rank=rank, world_size=2)
        assert batches.batches_per_epoch == 3
        seen += [tuple(map(tuple, next(batches)[0]["input_ids"].tolist())) for _ in range(3)]
    assert len(set(seen)) == 6


def test_build_data_reports_and_packs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [MULTI_TURN] * 4 + [{"prompt": "a", "response": "b"}] * 4)
    cfg = DataConfig(train_path=str(path), max_seq_len=512, packing=True)
    batches, stats = build_data(cfg, read_data(cfg), tokenizer, micro_batch_size=2, seed=0)
    assert stats.rows == 8 and stats.packed_rows is not None and stats.packed_rows < 8
    batch, counts = next(batches)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert 0 < counts.trained < counts.tokens <= counts.slots == batch["input_ids"].numel()
