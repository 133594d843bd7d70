"""The held-out loss: a seeded split never trained on, eval_loss logged/plotted/summarised, exact across a resume,
checked config keys, and checkpoints saved before these keys existed still resume."""

from __future__ import annotations

import shutil

import pytest
from train_helpers import run_dir, write_config

from cogumi.core.config import DataConfig, load_config
from cogumi.core.errors import UserError
from cogumi.train.data import encode_data, read_data
from cogumi.train.heldout import held_out_loss
from cogumi.train.trainer import training_hash, training_settings
from cogumi.train.trainlog import read_log

train_main = pytest.importorskip("train_phase1a_fullprecision").main
pytestmark = pytest.mark.usefixtures("one_thread")

# 12 rows: a quarter (3) held out leaves 9, two optimizer steps of 4 per epoch.
EVAL = {"data": {"eval_fraction": 0.25},
        "train": {"max_steps": 6, "micro_batch_size": 4, "log_every": 1, "eval_every": 2},
        "checkpoints": {"save_steps": 2, "keep_last": 3}}


def _evals(folder) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_log(folder / "train_log.jsonl") if "eval_loss" in r}


def _eval_of(config, adapter) -> float:
    """eval_loss of a saved adapter on the config's held-out set, outside the trainer."""
    from types import SimpleNamespace

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    encoded = encode_data(config.data, read_data(config.data), AutoTokenizer.from_pretrained(config.base_model),
                          seed=config.train.seed)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model), str(adapter))
    one = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    return held_out_loss(model, model, encoded.held_out, encoded.collate, 4, one)[0]


def test_the_held_out_split_is_seeded_disjoint_and_taken_before_packing(tiny_model_dir, memorised_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(train_path=str(memorised_data), max_seq_len=64, packing=True, eval_fraction=0.25)
    rows = read_data(cfg)
    whole = encode_data(DataConfig(train_path=str(memorised_data), max_seq_len=64, packing=False), rows, tokenizer,
                        seed=0)
    split = encode_data(cfg, rows, tokenizer, seed=0)
    key = lambda ex: tuple(ex.input_ids)  # noqa: E731
    trained = {key(ex) for row in split.items for ex in row}
    held = {key(ex) for row in split.held_out for ex in row}
    assert len(held) == 3 and len(trained) == 9 and not trained & held  # never trained on
    assert trained | held == {key(ex) for ex in whole.items}
    assert split.stats.held_out == 3 and split.stats.examples == 9
    assert split.stats.tokens == sum(len(ex.input_ids) for ex in whole.items) - split.held_out_tokens
    again = encode_data(cfg, rows, tokenizer, seed=123)  # train.seed does not move the split
    assert {key(ex) for row in again.held_out for ex in row} == held


def test_eval_loss_is_logged_plotted_summarised_and_exact_across_a_resume(tmp_path, tiny_base, memorised_data, env,
                                                                          capsys):
    cfg = write_config(tmp_path, tiny_base, memorised_data, **EVAL)
    assert train_main(["--phase", str(cfg)]) == 0
    out = run_dir(cfg)
    straight = _evals(out)
    assert sorted(straight) == [2, 4, 6] and all(0 < v < 20 for v in straight.values())
    rows = [r for r in read_log(out / "train_log.jsonl") if "eval_loss" in r]
    assert all(r["eval_tokens"] > 0 and r["eval_s"] >= 0 for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    assert f"eval_loss {straight[6]:.4f} (held out, step 6)" in capsys.readouterr().out
    from cogumi.core.manifest import read_manifest

    assert read_manifest(out / "adapter")["eval_loss"] == pytest.approx(straight[6], abs=1e-6)

    # The weights checkpoint-4 holds give step 4's number again: what a run resumed there evaluates on.
    assert _eval_of(load_config(cfg), out / "checkpoint-4" / "adapter") == pytest.approx(straight[4], abs=1e-6)
    # Back to checkpoint-4, as after a stop there: the resumed run's evals are the uninterrupted run's numbers.
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoint-6")
    assert train_main(["--phase", str(cfg), "train.eval_every=1"]) == 0  # eval_every is not a training setting
    resumed = _evals(out)
    assert resumed[4] == straight[4] and resumed[6] == pytest.approx(straight[6], abs=1e-6)
    assert sorted(resumed) == [2, 4, 5, 6]  # the log was cut back to step 4, then each step logged once
    assert [r["step"] for r in read_log(out / "train_log.jsonl") if "loss" in r] == list(range(1, 7))


def test_a_held_out_share_added_to_a_run_is_a_changed_setting_not_a_silent_resume(tmp_path, tiny_base,
                                                                                  memorised_data, env):
    cfg = write_config(tmp_path, tiny_base, memorised_data, train={"max_steps": 2})
    assert train_main(["--phase", str(cfg)]) == 0
    shutil.rmtree(run_dir(cfg) / "adapter")
    with pytest.raises(UserError, match="different training settings") as err:
        train_main(["--phase", str(cfg), "data.eval_fraction=0.25"])
    assert "data.eval_fraction: None -> 0.25" in err.value.what
    # a file of its own takes nothing from the training data: the same checkpoint resumes
    assert train_main(["--phase", str(cfg), f"data.eval_path={memorised_data}"]) == 0


def test_checkpoints_saved_before_the_new_keys_still_resume(tmp_path, tiny_base, memorised_data):
    """At their defaults the new keys are not part of what a checkpoint records, so its hash is unchanged."""
    cfg = load_config(write_config(tmp_path, tiny_base, memorised_data))
    settings = training_settings(cfg)
    assert set(settings["data"]) == {"train_path", "hub_split", "max_seq_len", "packing", "shuffle_seed"}
    assert "eval_every" not in settings["train"]
    # a held-out file of its own and the eval interval do not change what is trained
    assert training_hash(load_config(write_config(tmp_path, tiny_base, memorised_data),
                                     ["data.eval_path=x.jsonl", "train.eval_every=7"])) == training_hash(cfg)
    # an explicit row format may read rows differently from auto: a training setting
    assert training_hash(load_config(write_config(tmp_path, tiny_base, memorised_data),
                                     ["data.format=messages"])) != training_hash(cfg)


@pytest.mark.parametrize("override, key", [
    ("data.eval_fraction=0.5", "data.eval_fraction"),
    ("data.eval_fraction=-0.1", "data.eval_fraction"),
    ("data.eval_fraction=abc", "data.eval_fraction"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.eval_every=1.5", "train.eval_every"),
    ("data.format=jsonl", "data.format"),
])
def test_bad_eval_and_format_values_fail_at_load(tmp_path, tiny_base, memorised_data, override, key):
    path = write_config(tmp_path, tiny_base, memorised_data)
    with pytest.raises(UserError) as err:
        load_config(path, [override])
    assert key in err.value.render()


def test_two_held_out_sets_are_refused(tmp_path, tiny_base, memorised_data):
    with pytest.raises(UserError, match="both name a held-out set"):
        load_config(write_config(tmp_path, tiny_base, memorised_data),
                    ["data.eval_fraction=0.1", "data.eval_path=eval.jsonl"])


def test_shipped_phase_configs_hold_out_a_small_share(tmp_path):
    from cogumi.core.config import phase_config_path

    for phase in ("1a", "1b", "demo"):
        config = load_config(phase_config_path(phase))
        assert 0 < config.data.eval_fraction <= 0.05 and config.train.eval_every >= 1, phase


def test_the_run_card_shows_eval_loss_and_what_the_evals_cost():
    from cogumi import rehearsal
    from cogumi.core.config import phase_config_path

    real = load_config(phase_config_path("demo"))  # 300 steps, eval_loss every 100
    measured = rehearsal.Measured(seconds={"train": 60.0, "merge": 5.0, "validate": 10.0}, train_tokens_per_s=1e3,
                                  eval_rows=[{"step": 24, "eval_loss": 1.5, "eval_tokens": 900, "eval_s": 2.0}])
    card = rehearsal.predict(real, measured, 1176, 50_000, 24, {"math": 40, "code": 40}, 0)
    text = "\n".join(card.lines)
    assert "3 evals (every 100 steps) x 2.0 s of 900 held-out tokens" in text and "eval_loss 1.5000 at step 24" in text
    assert card.predicted["eval_s"] == 6.0
    without = rehearsal.predict(real, rehearsal.Measured(seconds=measured.seconds, train_tokens_per_s=1e3), 1176,
                                50_000, 24, {"math": 40, "code": 40}, 0)
    assert "no eval_loss" in "\n".join(without.lines) and without.predicted["eval_s"] == 0.0
    assert card.predicted["total_s"] == pytest.approx(without.predicted["total_s"] + 6.0)


def test_held_out_loss_is_the_token_mean_of_each_example_alone_packed_or_not(tiny_model_dir, memorised_data):
    """The number is the mean over every answer token of the held-out set: not a mean of micro-batch means, the same
    packed (the packed attention) or not, and the same however the micro-batches are cut."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.train.data import IGNORE_INDEX, Collator, pack
    from cogumi.train.packed_attention import packed_attention

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    examples = encode_data(DataConfig(train_path=str(memorised_data), max_seq_len=64, packing=False),
                           read_data(DataConfig(train_path=str(memorised_data))), tokenizer, seed=0).items
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex.labels])
            labels[0, 0] = IGNORE_INDEX  # an example's first token is never a target
            trained = int((labels[0, 1:] != IGNORE_INDEX).sum())
            loss_sum += model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss.item() * trained
            n += trained
    one = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    plain = held_out_loss(model, model, examples, Collator(0, packed=False), 5, one)
    assert plain[1] == n and plain[0] == pytest.approx(loss_sum / n, rel=1e-5)
    assert held_out_loss(model, model, examples, Collator(0, packed=False), 2, one)[0] == pytest.approx(plain[0],
                                                                                                       rel=1e-5)
    with packed_attention(model, "sdpa_block_mask"):
        packed = held_out_loss(model, model, pack(examples, 128), Collator(0, packed=True), 2, one)
    assert packed[1] == n and packed[0] == pytest.approx(plain[0], rel=1e-4)
    assert model.training  # switched back for the next training step


def test_the_tracker_gets_eval_loss_beside_the_training_loss(tmp_path, tiny_base, memorised_data, env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path, tiny_base, memorised_data, data={"eval_path": str(memorised_data)},
                       train={"max_steps": 4, "log_every": 2, "eval_every": 2, "report_to": "tensorboard"})
    assert train_main(["--phase", str(cfg)]) == 0
    events = EventAccumulator(str(run_dir(cfg) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/eval_loss")]
    assert logged == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in _evals(run_dir(cfg)).items()]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
