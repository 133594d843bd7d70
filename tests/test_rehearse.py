"""`make rehearse PHASE=demo`: every step for real in a hidden folder, the run card, nothing left behind."""

from __future__ import annotations

import pytest

from cogumi.core.paths import REPO_ROOT


@pytest.mark.slow
def test_rehearsal_of_the_demo_runs_every_step_prints_the_card_and_leaves_nothing(tmp_path, run_script):
    import demo

    base = tmp_path / "demo_base"
    demo.write_tiny_base(base, REPO_ROOT / "data" / "demo" / "train.jsonl")
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir())
    result = run_script("rehearse.py", "--phase", "demo", f"base_model={base}", f"validate.baseline={base}",
                        f"output_root={tmp_path}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "== run card: demo" in out and "GPU-hours" in out and "peak disk" in out, out[-2000:]
    assert "resumed from checkpoint-" in out  # the Ctrl-C'd first run was resumed by the same command
    assert "300 steps" in out  # the prediction is for the real config (train.max_steps: 300), not the rehearsal's
    assert "3 evals (every 100 steps)" in out and "the rehearsal's eval_loss" in out  # demo: eval_every 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_base"]  # no run folder, no hidden folder left
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir()) == before


def _rehearsal_inputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rehearsal_inputs", REPO_ROOT / "scripts/bench/rehearsal_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rehearsal_inputs_export_the_phase_problems_exactly(tmp_path):
    from cogumi.evaluate.sources import load_task

    inputs = _rehearsal_inputs()
    math_file, code_file = inputs.export_eval(tmp_path)
    for source, path in (("math500", math_file), ("humaneval", code_file)):
        built_in, exported = load_task(source), load_task(str(path))
        assert len(exported) == len(built_in) > 100
        keep = ("task", "id", "prompt", "answer", "tests", "entry_point")
        assert [[getattr(p, k) for k in keep] for p in exported] == [[getattr(p, k) for k in keep] for p in built_in]


def test_rehearsal_train_data_has_the_mix_lengths(tmp_path):
    import json
    import statistics

    from cogumi.demo.tiny import build_tokenizer

    inputs = _rehearsal_inputs()
    tokenizer = build_tokenizer()
    stats = inputs.write_train_data(tmp_path / "train.jsonl", tokenizer, 200)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == stats["rows"] == 200
    encoded = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True)) for r in rows]
    # within 15 % of the lengths they stand for: tokens/s measured on them is the real mix's
    assert abs(statistics.mean(encoded) / stats["mean_tokens"] - 1) < 0.15, (statistics.mean(encoded), stats)


def test_the_card_counts_packed_rows_as_the_trainer_does(tiny_model_dir):
    # phase 1A packs: the card once counted examples as rows, predicting ~7x the steps the trainer plans (B34)
    from cogumi import rehearsal
    from cogumi.core.config import load_config, phase_config_path
    from cogumi.train.trainer import make_plan

    common = [f"base_model={tiny_model_dir}", "data.max_seq_len=1024", "train.max_steps=null"]
    unpacked = load_config(phase_config_path("demo"), [*common, "data.packing=false"])
    packed = load_config(phase_config_path("demo"), [*common, "data.packing=true"])
    examples, tokens = rehearsal.data_shape(unpacked)
    rows, packed_tokens = rehearsal.data_shape(packed)
    assert packed_tokens == tokens and rows < examples / 4  # ~10 demo examples fit one 1024-token row
    assert make_plan(packed, rows, tokens).total_steps < make_plan(packed, examples, tokens).total_steps


def _card_inputs(real, decode: dict):
    from cogumi import rehearsal

    # the H200 report of ISSUES_LOG B44: the rehearsal's 4 problems decoded at 470 tokens/s (a batch of 4); the
    # full run decoded at batches of 164-191 at 5,581-7,025 tokens/s and took 268 s where the card said 1.01 h
    measured = rehearsal.Measured(seconds={"train": 100.0, "merge": 30.0, "validate": 80.0},
                                  train_tokens_per_s=5000.0)
    measured.validation = {"math": {"prompts": 4, "generation_s": 2 * 4 * 400 / 470, "new_tokens": 2 * 4 * 400,
                                    "sides": 2, "tokens_per_s": [470.0, 470.0]}}
    measured.decode = {"math": decode}
    return measured


def test_the_card_predicts_validation_at_the_full_run_batch_size(tiny_model_dir):
    from cogumi import rehearsal
    from cogumi.core.config import load_config, phase_config_path

    real = load_config(phase_config_path("demo"), [f"base_model={tiny_model_dir}", "validate.max_new_tokens=1024"])
    measured = _card_inputs(real, {"batch": 164, "tokens_per_s": 6000.0})
    card = rehearsal.predict(real, measured, rows=100, tokens=100_000, rehearsal_steps=24, full_problems={"math": 500},
                             base_bytes=0)
    overhead = 80.0 - 2 * 4 * 400 / 470  # loading and judging, as measured
    # 2 models x 500 answers x 400 tokens (the rehearsal's mean) at the batch-164 rate, not 4-row seconds x 125
    assert card.predicted["validate_s"] == pytest.approx(2 * 500 * 400 / 6000 + overhead, abs=0.1)
    assert card.predicted["validate_s"] < 0.2 * (2 * 500 * 400 / 470)  # the old extrapolation: 10x too long
    assert card.predicted["validate_decode"] == {"math": {"batch": 164, "tokens_per_s": 6000.0}}
    validate_line = next(line for line in card.lines if line.lstrip().startswith("validate"))
    assert "batch 164" in validate_line and "6,000 tokens/s" in validate_line, validate_line

    # the answers' mean length never counts past max_new_tokens
    capped = load_config(phase_config_path("demo"), [f"base_model={tiny_model_dir}", "validate.max_new_tokens=100"])
    card = rehearsal.predict(capped, _card_inputs(capped, {"batch": 164, "tokens_per_s": 6000.0}), rows=100,
                             tokens=100_000, rehearsal_steps=24, full_problems={"math": 500}, base_bytes=0)
    assert card.predicted["validate_answer_tokens"] == {"math": 100}


def test_the_decode_probe_runs_one_batch_of_the_full_run_size_on_the_real_model(tiny_model_dir):
    from cogumi.evaluate.generate import decode_rate, load_model, unload

    loaded = load_model(tiny_model_dir)  # on this CPU: batches of validate.batch_size rows
    prompts = [f"What is {i} + {i}?" for i in range(40)]
    try:
        for fast in (False, True):  # the CPU path, and the static-cache path the GPU runs
            full = decode_rate(loaded, prompts, max_new_tokens=64, batch_size=16, probe_tokens=8, fast=fast)
            assert full["batch"] == 16 and full["new_tokens"] == 16 * 8 and full["tokens_per_s"] > 0, full
            few = decode_rate(loaded, prompts[:4], max_new_tokens=64, batch_size=16, probe_tokens=8, fast=fast)
            assert few["batch"] == 4 and few["new_tokens"] == 4 * 8, few  # never more rows than prompts
    finally:
        unload(loaded)
