"""train.report_to: a tiny real training run writes tensorboard event files and an offline wandb run, read back here
and compared with train_log.jsonl; `make validate`'s win/tie/loss table lands in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import run_dir, write_config

from cogumi.core.config import load_config
from cogumi.core.errors import UserError
from cogumi.core.tracking import WANDB_ID_FILE, parse_report_to, record_validation
from cogumi.evaluate.pairing import summarize
from cogumi.train.trainlog import read_log

train_main = pytest.importorskip("train_phase1a_fullprecision").main
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = {"max_steps": 6, "log_every": 2}


def validation_report() -> dict:
    math = summarize(["win"] * 5 + ["tie_right"] * 30 + ["tie_wrong"] * 10 + ["loss"] * 5)
    return {"tasks": {"math": math}, "passed": True}


@pytest.fixture()
def trained(tmp_path, tiny_base, memorised_data, env, request):
    """A tiny run with train.report_to set to the test's parameter; (config, its train_log.jsonl rows, its file)."""
    env.setenv("WANDB_MODE", "offline")  # no network, no login
    env.setenv("WANDB_SILENT", "true")
    cfg = write_config(tmp_path, tiny_base, memorised_data, train={**STEPS, "report_to": request.param})
    assert train_main(["--phase", str(cfg)]) == 0
    config = load_config(cfg)
    rows = read_log(run_dir(cfg) / "train_log.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 6]
    return config, rows, cfg


def test_report_to_accepts_none_one_or_a_list_and_refuses_the_rest():
    assert parse_report_to("none") == () and parse_report_to(None) == () and parse_report_to([]) == ()
    assert parse_report_to("wandb") == ("wandb",)
    assert parse_report_to(["tensorboard", "wandb", "tensorboard"]) == ("tensorboard", "wandb")
    with pytest.raises(UserError, match="unknown train.report_to 'mlflow'"):
        parse_report_to(["tensorboard", "mlflow"])
    with pytest.raises(UserError, match="must be none, tensorboard, wandb or a list"):
        parse_report_to({"tensorboard": True})


def test_switching_tracking_on_or_off_still_resumes(tmp_path, tiny_base, memorised_data):
    # Tracking is a view of the log: a run started without it may resume with it (no "different settings" refusal).
    from cogumi.train.trainer import training_hash

    cfg = write_config(tmp_path, tiny_base, memorised_data)
    plain = training_hash(load_config(cfg))
    assert training_hash(load_config(cfg, ["train.report_to=[tensorboard,wandb]"])) == plain
    assert training_hash(load_config(cfg, ["train.learning_rate=1e-3"])) != plain


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("trained", ["tensorboard"], indirect=True)
def test_tensorboard_event_files_hold_the_train_log_the_config_and_the_validation_table(trained):
    config, rows, _ = trained
    folder = config.run_dir / "tensorboard"
    events = tensorboard_events(folder)
    for key in ("loss", "lr", "tokens_per_s", "peak_mem_gib"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows], key
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to: tensorboard" in config_text and "max_steps: 6" in config_text
    assert not (config.run_dir / "wandb").exists()

    record_validation(config, validation_report())
    events = tensorboard_events(folder)
    assert [e.value for e in events.Scalars("validate/math/win_pct")] == [10.0]
    assert [e.value for e in events.Scalars("validate/math/loss_pct")] == [10.0]
    assert [e.value for e in events.Scalars("validate/passed")] == [1.0]
    table = events.Tensors("validate/win_tie_loss/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| math | 50 | 10.0 | 60.0 | 20.0 | 10.0 | 1.0 |" in table


@pytest.mark.parametrize("trained", ["tensorboard"], indirect=True)
def test_a_resumed_run_logs_each_step_once(trained, env):
    # A crash after step 6 was logged but before its checkpoint completed: the run resumes from checkpoint-4 and
    # logs 6 again; tensorboard must show it once, with the resumed run's value, as train_log.jsonl does.
    import shutil

    config, _, config_file = trained
    shutil.rmtree(config.run_dir / "checkpoint-6")
    shutil.rmtree(config.run_dir / "adapter")
    assert train_main(["--phase", str(config_file)]) == 0
    rows = read_log(config.run_dir / "train_log.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 6]
    logged = [(e.step, e.value) for e in tensorboard_events(config.run_dir / "tensorboard").Scalars("train/loss")]
    assert logged == [(row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in rows]


def wandb_records(folder: Path) -> list:
    """Every record of the offline runs under folder/wandb, in file order (wandb's own reader)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    records = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            records.append(record)
    return records


@pytest.mark.slow  # wandb starts its service process: ~30 s on the 2-core machine
@pytest.mark.parametrize("trained", [["tensorboard", "wandb"]], indirect=True)
def test_offline_wandb_run_holds_the_train_log_the_config_and_the_validation_table(trained):
    config, rows, _ = trained
    assert (config.run_dir / "tensorboard").is_dir()  # both reporters at once
    run_id = (config.run_dir / WANDB_ID_FILE).read_text().strip()
    records = wandb_records(config.run_dir)
    history = [{item.key: json.loads(item.value_json) for item in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"], h["train/tokens_per_s"]) for h in history] == [
        (row["step"], pytest.approx(row["loss"]), pytest.approx(row["tokens_per_s"])) for row in rows]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.display_name == config.name
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["train"]["report_to"] == ["tensorboard", "wandb"]
    assert logged_config["lora"]["r"] == 8

    record_validation(config, validation_report())  # a second offline run with the same id: `wandb sync` joins them
    runs = sorted(config.run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)
    later = [r for r in wandb_records(config.run_dir)[len(records):]]
    tables = [json.loads(item.value_json) for r in later if r.WhichOneof("record_type") == "history"
              for item in r.history.item if item.key == "validate/win_tie_loss"]
    assert tables and tables[0]["_type"] == "table-file" and tables[0]["nrows"] == 1
    summary = {item.key: json.loads(item.value_json) for r in later if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary["validate/math/win_pct"] == 10.0 and summary["validate/passed"] == 1
