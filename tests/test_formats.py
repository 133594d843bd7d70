"""The data people have: ShareGPT, Alpaca, messages and prompt/response rows, in JSONL, JSON, parquet and CSV files,
each trained on the tiny tokenizer; a row of no known shape names the keys it has, and its file and line."""

from __future__ import annotations

import json

import pytest
from train_helpers import run_dir, write_config

from cogumi.core.errors import UserError
from cogumi.train.data import IGNORE_INDEX, DataStats, encode_rows, read_rows
from cogumi.train.trainlog import read_log

train_main = pytest.importorskip("train_phase1a_fullprecision").main
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    "messages": {"messages": [{"role": "user", "content": "Say fox."}, {"role": "assistant", "content": "fox"}]},
    "prompt_response": {"prompt": "Say fox.", "response": "fox"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say fox."},
                                   {"from": "gpt", "value": "fox"}]},
    "alpaca": {"instruction": "Say the word.", "input": "fox", "output": "fox"},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(path, rows):
    import pandas as pd

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _answers(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                             if label != IGNORE_INDEX])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("fmt", ["auto", "named"])
def test_every_shape_is_read_and_trains_only_on_the_answer(tmp_path, tokenizer, shape, fmt):
    rows, where = read_rows(str(_write(tmp_path / "train.jsonl", [SHAPES[shape]] * 2)))
    examples = encode_rows(tokenizer, rows, 128, DataStats(where), shape if fmt == "named" else "auto")
    assert len(examples) == 2 and _answers(tokenizer, examples[0]).startswith("fox")
    text = tokenizer.decode(examples[0].input_ids)
    assert "Say" in text and ("Be brief." in text) == (shape == "sharegpt")


@pytest.mark.parametrize("suffix, shape", [(".parquet", "messages"), (".parquet", "sharegpt"),
                                           (".csv", "alpaca"), (".csv", "prompt_response"), (".json", "sharegpt")])
def test_local_parquet_csv_and_json_files_are_read_offline(tmp_path, tokenizer, suffix, shape):
    path = _write(tmp_path / f"train{suffix}", [SHAPES[shape]] * 3)
    rows, source = read_rows(str(path))
    assert source == str(path) and len(rows) == 3 and rows[2][0].startswith(f"{path}")
    examples = encode_rows(tokenizer, rows, 128, DataStats(source))
    assert [_answers(tokenizer, ex).startswith("fox") for ex in examples] == [True] * 3


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":3"), (".parquet", " row 3"), (".csv", ":4 (row 3)"),
                                           (".json", " row 3")])
def test_a_row_of_no_known_shape_names_its_keys_file_and_line(tmp_path, tokenizer, suffix, where):
    good = SHAPES["alpaca"]
    path = _write(tmp_path / f"train{suffix}", [good, good, {"instruction": "Say fox.", "input": "x", "output": None,
                                                             "answer": "fox"}])
    rows, _ = read_rows(str(path))
    with pytest.raises(UserError) as err:
        encode_rows(tokenizer, rows, 128, DataStats("t"))
    rendered = err.value.render()
    assert f"{path}{where}" in rendered and "['answer', 'input', 'instruction']" in rendered
    assert "data.format" in rendered


def test_a_named_format_checks_its_own_keys(tmp_path, tokenizer):
    rows, _ = read_rows(str(_write(tmp_path / "train.jsonl", [SHAPES["alpaca"]])))
    with pytest.raises(UserError, match="'conversations' must be a non-empty list"):
        encode_rows(tokenizer, rows, 128, DataStats("t"), "sharegpt")
    bad = {"conversations": [{"from": "narrator", "value": "hi"}]}
    rows, _ = read_rows(str(_write(tmp_path / "bad.jsonl", [bad])))
    with pytest.raises(UserError, match="turn 0 needs 'from'") as err:
        encode_rows(tokenizer, rows, 128, DataStats("t"))
    assert f"{tmp_path / 'bad.jsonl'}:1" in err.value.render()


def test_a_sharegpt_parquet_file_trains(tmp_path, tiny_base, env):
    rows = [{"conversations": [{"from": "human", "value": f"What is {i} + {i}?"},
                               {"from": "gpt", "value": f"The answer is {2 * i}."}]} for i in range(8)]
    data = _write(tmp_path / "chats.parquet", rows)
    cfg = write_config(tmp_path, tiny_base, data, data={"format": "sharegpt"}, train={"max_steps": 2})
    assert train_main(["--phase", str(cfg)]) == 0
    assert [r["step"] for r in read_log(run_dir(cfg) / "train_log.jsonl")] == [1, 2]


def test_a_columnar_file_mixing_shapes_is_read_row_by_row(tmp_path, tokenizer):
    """parquet and CSV give every row every column, None where it had none: auto looks at the non-empty ones."""
    path = _write(tmp_path / "mixed.parquet", [SHAPES["prompt_response"], SHAPES["messages"], SHAPES["alpaca"]])
    rows, _ = read_rows(str(path))
    assert rows[0][1]["messages"] is None  # what the columnar loader hands over
    examples = encode_rows(tokenizer, rows, 128, DataStats("t"))
    assert [_answers(tokenizer, ex).startswith("fox") for ex in examples] == [True] * 3


def test_other_column_and_speaker_names_map_onto_a_shape(tmp_path, tokenizer):
    from cogumi.train.rows import Shape

    rows = [{"question": "Say fox.", "answer": "fox"},
            {"dialog": [{"role": "person", "content": "Say fox."}, {"role": "bot", "content": "fox"}]}]
    rows, _ = read_rows(str(_write(tmp_path / "own.jsonl", rows)))
    shape = Shape(columns={"prompt": "question", "response": "answer", "messages": "dialog"},
                  roles={"person": "user", "bot": "assistant"})
    examples = encode_rows(tokenizer, rows, 128, DataStats("t"), shape)
    assert [_answers(tokenizer, ex).startswith("fox") for ex in examples] == [True, True]
    with pytest.raises(UserError, match="role 'person'") as err:
        encode_rows(tokenizer, rows[1:], 128, DataStats("t"), Shape(columns={"messages": "dialog"}))
    assert "data.roles maps other names" in err.value.fix


@pytest.mark.parametrize("override, expect", [("data.columns={answer: x}", "which no row shape reads"),
                                              ("data.columns={prompt: ''}", "a column name"),
                                              ("data.roles={bot: robot}", "one of system, user, assistant")])
def test_bad_column_and_role_maps_fail_at_load(tmp_path, tiny_base, memorised_data, override, expect):
    from cogumi.core.config import load_config

    with pytest.raises(UserError, match=expect):
        load_config(write_config(tmp_path, tiny_base, memorised_data), [override])


def test_a_list_of_sources_is_a_mixture_of_all_their_rows(tmp_path, tokenizer):
    from cogumi.core.config import DataConfig
    from cogumi.train.data import read_data

    jsonl = _write(tmp_path / "a.jsonl", [SHAPES["sharegpt"]] * 2)
    parquet = _write(tmp_path / "b.parquet", [SHAPES["alpaca"]] * 3)
    data = read_data(DataConfig(train_path=[str(jsonl), str(parquet)]))
    assert len(data.rows) == 5 and data.source == f"{jsonl} + {parquet}"
    assert data.rows[1][0] == f"{jsonl}:2" and data.rows[4][0] == f"{parquet} row 3"
    assert len(encode_rows(tokenizer, data.rows, 128, DataStats(data.source))) == 5


@pytest.mark.parametrize("value", ["[]", "['']", "[1]", "{a: 1}"])
def test_a_bad_train_path_fails_at_load(tmp_path, tiny_base, memorised_data, value):
    from cogumi.core.config import load_config

    with pytest.raises(UserError, match="data.train_path"):
        load_config(write_config(tmp_path, tiny_base, memorised_data), [f"data.train_path={value}"])
