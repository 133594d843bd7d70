"""Every write outside checkpoint saves is safe on a full disk, on a real tmpfs: train_log.jsonl rows are appended
whole or not at all (a torn last line is repaired on resume), and the final adapter export stops with DiskStop
(exit 3), leaving nothing half-written, then succeeds once there is room."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tmpfs_util import fill_file, mount_tmpfs, unmount

from cogumi.core.config import load_config
from cogumi.core.errors import UserError
from cogumi.core.paths import SCRIPTS_DIR
from cogumi.train.checkpoints import DiskStop
from cogumi.train.trainlog import append_row, read_log, truncate_log

MB = 1024 * 1024


@pytest.fixture()
def small_fs(tmp_path):
    where = mount_tmpfs(tmp_path / "fs", 4 * MB)
    yield where
    unmount(where)


def fill_up(fs: Path) -> Path:
    """Fill the filesystem to the last byte (as another writer would)."""
    filler = fs / "someone-elses-cache.bin"
    st = os.statvfs(fs)
    fill_file(filler, st.f_bavail * st.f_frsize)
    assert os.statvfs(fs).f_bavail == 0
    return filler


def test_log_row_is_whole_or_not_there_on_a_full_disk(small_fs):
    log = small_fs / "train_log.jsonl"
    append_row(log, {"step": 1, "loss": 1.0})
    filler = fill_up(small_fs)
    before = log.read_bytes()
    big = {"step": 2, "loss": 0.5, "note": "x" * 20000}  # longer than any free slack in the file's last page
    with pytest.raises(DiskStop) as err:
        append_row(log, big)
    assert err.value.exit_code == 3 and "make train" in err.value.fix
    assert log.read_bytes() == before  # nothing of the row is left
    filler.unlink()
    append_row(log, big)
    assert [row["step"] for row in read_log(log)] == [1, 2]


def test_torn_last_line_is_dropped_on_resume_and_a_bad_middle_line_is_named(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')  # an older crash
    assert [row["step"] for row in read_log(log)] == [1, 2]
    truncate_log(log, step=2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    log.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(UserError) as err:
        truncate_log(log, step=3)
    assert err.value.where == f"{log}:2"


def _tiny_peft(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_adapter_export_on_a_full_disk_stops_cleanly_then_finishes(small_fs, tmp_path, tiny_model_dir):
    import torch

    from cogumi.train.export import export_adapter
    from cogumi.train.model import Base, Runtime
    from cogumi.train.trainer import Result

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: run\noutput_root: {small_fs}\nbase_model: {tiny_model_dir}\n")
    config = load_config(cfg)
    config.run_dir.mkdir(parents=True)
    model = _tiny_peft(tiny_model_dir)
    base = Base(spec=str(tiny_model_dir), path=tiny_model_dir, fingerprint="f", unvalidated_warning=None)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, attention="sdpa")
    result = Result(steps=4, final_loss=0.1, tokens_per_s=1.0, peak_mem_gib=0.1, seconds=1.0, resumed_from=None)
    (config.run_dir / ".adapter.tmp").mkdir()  # a killed export's leftover: removed, never kept or renamed
    (config.run_dir / ".adapter.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    filler = fill_up(small_fs)

    with pytest.raises(DiskStop) as err:
        export_adapter(config, model, base, runtime, result)
    assert err.value.exit_code == 3 and "run the same `make train` again" in err.value.fix
    leftovers = sorted(p.name for p in small_fs.rglob("*") if p != filler)
    assert leftovers == ["run"], leftovers  # no adapter/, no .adapter.tmp*, nothing half-written

    filler.unlink()
    adapter = export_adapter(config, model, base, runtime, result)
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "manifest.json"]
    assert json.loads((adapter / "manifest.json").read_text())["steps"] == 4
    assert sorted(p.name for p in config.run_dir.iterdir()) == ["adapter"]


@pytest.mark.slow
def test_disk_filling_between_saves_stops_with_3_and_the_same_command_finishes(small_fs, tmp_path, tiny_model_dir):
    """The issue's case 1: the log append after a checkpoint meets a full disk; before, it left half a row and
    every later `make train` died in JSONDecodeError."""
    import subprocess
    import sys
    import time

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "response": f"{2 * i}."}) + "\n"
                            for i in range(16)))
    cfg = tmp_path / "fill.yaml"
    cfg.write_text(f"""name: fillrun
base_model: {tiny_model_dir}
output_root: {small_fs}
data: {{train_path: {data}, max_seq_len: 32}}
lora: {{r: 2, alpha: 4, target_modules: [q_proj]}}
train: {{max_steps: 40, micro_batch_size: 2, grad_accum: 1, log_every: 1, seed: 3}}
checkpoints: {{save_steps: 5, keep_last: 1}}
disk: {{margin_mb: 0, monitor: false}}
""")
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS_DIR), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPTS_DIR / "train_phase1a_fullprecision.py"), "--phase", str(cfg)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = small_fs / "fillrun" / "train_log.jsonl"
    first = small_fs / "fillrun" / "checkpoint-5" / "COMPLETE"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not first.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    filler = fill_up(small_fs)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, output[-3000:]
    # Which write meets the full disk first (a log row, whose page may still have slack, or the next save) is a
    # race; each must stop with 3 and one message, and leave whole rows only.
    assert "Traceback" not in output and "\nERROR: " in output, output[-6000:]
    assert log.read_text().endswith("\n")  # whole rows only

    filler.unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "continuing from" in again.stderr
    assert [row["step"] for row in read_log(log)] == list(range(1, 41))
