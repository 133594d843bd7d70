"""Training on CPU with the tiny fixture: it learns, refuses bad bases before loading weights, resumes exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import TRAIN_SCRIPT, adapter_weights, max_diff, run_dir, write_config

from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import UserError
from cogumi.core.manifest import read_manifest, write_manifest
from cogumi.core.paths import REPO_ROOT, SCRIPTS_DIR
from cogumi.train.checkpoints import COMPLETE, list_complete
from cogumi.train.trainer import STATE_FILE
from cogumi.train.trainlog import read_log

train_main = pytest.importorskip("train_phase1a_fullprecision").main
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- it learns


def test_short_run_lowers_loss_and_writes_every_output(tmp_path, tiny_base, memorised_data, env, capsys):
    cfg = write_config(tmp_path, tiny_base, memorised_data,
                       train={"max_steps": 16, "log_every": 2, "micro_batch_size": 4},
                       checkpoints={"save_steps": 5, "keep_last": 2})
    assert train_main(["--phase", str(cfg)]) == 0
    out = run_dir(cfg)
    losses = [row["loss"] for row in read_log(out / "train_log.jsonl")]
    assert losses[-1] < 0.2 * losses[0], losses
    row = read_log(out / "train_log.jsonl")[-1]
    assert set(row) == {"step", "loss", "lr", "tokens_per_s", "mfu", "padding", "peak_mem_gib"} and row["step"] == 16
    assert [step for step, _ in list_complete(out)] == [15, 16]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").stat().st_size > 1000
    assert load_config(out / "config.resolved.yaml").train.max_steps == 16
    manifest = read_manifest(out / "adapter")
    assert manifest["kind"] == "adapter" and manifest["trained_on_quantized"] is False
    assert manifest["base_model"] == str(tiny_base) and manifest["base_fingerprint"]
    assert manifest["allowed_unvalidated"] is None and manifest["lora"]["r"] == 8 and manifest["dtype"] == "float32"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_base)
    summary = capsys.readouterr().out
    assert "steps        16" in summary and str(out / "adapter") in summary


# ---------------------------------------------------------------- refusals before any weight loads


@pytest.fixture()
def no_weight_loading(monkeypatch):
    """Any attempt to load model weights fails the test: refusals must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the guard refused the base")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_config_quantization(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))


def _with_packed_weight(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] // 2, dtype=torch.uint8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _with_quant_state(model: Path) -> None:
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight.absmax"] = torch.ones(4)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("folder, change, expect", [
    ("plain", _with_config_quantization, "quantization_config"),
    ("plain", _with_packed_weight, "packed U8"),
    ("plain", _with_quant_state, "quantization state"),
    ("llama-unsloth-bnb-4bit", None, "bnb"),
    ("llama-GPTQ-Int4", None, "GPTQ"),
    ("llama-AWQ", None, "AWQ"),
    ("llama-4bit", None, "4bit"),
])
def test_every_local_quantized_form_is_refused(tmp_path, tiny_base, memorised_data, env, no_weight_loading,
                                               folder, change, expect):
    model = _copy_model(tiny_base, tmp_path / "models" / folder)
    if change:
        change(model)
    cfg = write_config(tmp_path, model, memorised_data)
    env.setenv("FORCE", "1")  # there is deliberately no override for a quantized base
    with pytest.raises(UserError) as err:
        train_main(["--phase", str(cfg)])
    text = err.value.render()
    assert "quantized" in text and expect in text and "merge" in text and "bf16" in text
    assert not run_dir(cfg).exists()  # refused before the run folder was touched


def test_quantized_hub_ids_are_refused_before_any_download(tmp_path, memorised_data, env, no_weight_loading):
    from cogumi.core import hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted for a base refused by its name")

    env.setattr(hub, "fetch_config", no_network)
    env.setattr(hub, "download", no_network)
    cfg = write_config(tmp_path, "unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit", memorised_data)
    with pytest.raises(UserError, match="quantized"):
        train_main(["--phase", str(cfg)])

    # A neutral name whose config.json declares quantization: refused after the few-KB config, before the weights.
    env.setattr(hub, "fetch_config", lambda repo: {"quantization_config": {"quant_method": "gptq"}})
    cfg = write_config(tmp_path, "someone/llama-finetune", memorised_data, name="hubq")
    with pytest.raises(UserError, match="quant_method=gptq"):
        train_main(["--phase", str(cfg)])


def test_missing_previous_phase_is_reported_as_missing_not_looked_up():
    from cogumi.train.model import build_base

    config = load_config(phase_config_path("1b"), ["output_root=/nonexistent"])
    if (REPO_ROOT / config.base_model).exists():
        pytest.skip("a real phase1a_merged exists in this checkout")
    with pytest.raises(UserError, match="base model folder not found"):
        build_base(config)


# ---------------------------------------------------------------- VALIDATED stamp of a previous phase


def test_unvalidated_merged_base_refused_and_allow_unvalidated_recorded(tmp_path, tiny_base, memorised_data, env):
    merged = _copy_model(tiny_base, tmp_path / "models" / "phase1a_merged")
    write_manifest(merged, "merged", base_model="tiny")
    cfg = write_config(tmp_path, merged, memorised_data, name="phase1b", train={"max_steps": 2})
    with pytest.raises(UserError) as err:
        train_main(["--phase", str(cfg)])
    assert "VALIDATED" in err.value.render() and "ALLOW_UNVALIDATED=1" in err.value.render()
    env.setenv("FORCE", "1")  # FORCE only replaces outputs: it no longer admits an unvalidated base
    with pytest.raises(UserError, match="VALIDATED"):
        train_main(["--phase", str(cfg)])

    env.setenv("ALLOW_UNVALIDATED", "yes")
    assert train_main(["--phase", str(cfg)]) == 0
    warning = read_manifest(run_dir(cfg) / "adapter")["allowed_unvalidated"]
    assert warning and "VALIDATED" in warning and "ALLOW_UNVALIDATED=1" in warning


# ---------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_train_again_equals_uninterrupted(tmp_path, tiny_base, memorised_data,
                                                                         env, capsys):
    sections = {"train": {"max_steps": 16, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1},
                "lora": {"dropout": 0.1},  # dropout draws from the torch RNG: the resume must restore it
                "checkpoints": {"save_steps": 3, "keep_last": 2}}
    straight = write_config(tmp_path, tiny_base, memorised_data, root="straight", **sections)
    assert train_main(["--phase", str(straight)]) == 0

    killed = write_config(tmp_path, tiny_base, memorised_data, root="killed",
                          disk={"monitor": True}, **sections)  # the sidecar must not outlive a kill -9
    kill_at = random.randint(3, 10)
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--phase", str(killed)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = run_dir(killed) / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        rows = read_log(log_path) if log_path.exists() else []
        if rows and rows[-1]["step"] >= kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=30) == -signal.SIGKILL, f"the run ended before step {kill_at} could be killed"
    assert not (run_dir(killed) / "adapter").exists()

    capsys.readouterr()
    # Running again is a fresh main() in this process (a second interpreter start costs ~15 s on a loaded CPU):
    # nothing but the files on disk carries over from the killed process.
    assert train_main(["--phase", str(killed)]) == 0
    assert "resumed from checkpoint-" in capsys.readouterr().out
    diff = max_diff(adapter_weights(run_dir(straight) / "adapter"), adapter_weights(run_dir(killed) / "adapter"))
    assert diff <= 1e-6, f"killed at step >= {kill_at}: adapters differ by {diff}"
    assert [row["step"] for row in read_log(log_path)] == list(range(1, 17))


def test_checkpoint_without_complete_is_never_resumed_from(tmp_path, tiny_base, memorised_data, env):
    cfg = write_config(tmp_path, tiny_base, memorised_data, train={"max_steps": 8},
                       lora={"dropout": 0.1}, checkpoints={"save_steps": 2, "keep_last": 3})
    assert train_main(["--phase", str(cfg)]) == 0
    out = run_dir(cfg)
    reference = adapter_weights(out / "adapter")
    shutil.move(out / "adapter", tmp_path / "reference-adapter")
    # The newest checkpoint loses its marker (a save killed before COMPLETE) and its state is garbage;
    # a higher-numbered folder without a marker must not win either.
    (out / "checkpoint-8" / COMPLETE).unlink()
    (out / "checkpoint-8" / STATE_FILE).write_bytes(b"half-written")
    (out / "checkpoint-100").mkdir()
    assert train_main(["--phase", str(cfg)]) == 0
    assert max_diff(reference, adapter_weights(out / "adapter")) <= 1e-6
    assert [step for step, _ in list_complete(out)] == [4, 6, 8]
    assert [row["step"] for row in read_log(out / "train_log.jsonl")] == list(range(1, 9))


def test_finished_run_is_a_no_op_and_resume_0_moves_it_aside(tmp_path, tiny_base, memorised_data, env):
    cfg = write_config(tmp_path, tiny_base, memorised_data, train={"max_steps": 2})
    assert train_main(["--phase", str(cfg)]) == 0
    out = run_dir(cfg)
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert train_main(["--phase", str(cfg)]) == 0  # make train again: already finished, nothing rewritten
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == first

    env.setenv("RESUME", "0")
    assert train_main(["--phase", str(cfg)]) == 0
    olds = [p for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.old-")]
    assert len(olds) == 1
    old = olds[0]
    assert (old / "adapter" / "adapter_model.safetensors").read_bytes() == first  # kept, not deleted
    assert [row["step"] for row in read_log(out / "train_log.jsonl")] == [1, 2]  # a fresh run


def test_changed_settings_do_not_silently_resume(tmp_path, tiny_base, memorised_data, env):
    cfg = write_config(tmp_path, tiny_base, memorised_data, train={"max_steps": 4})
    assert train_main(["--phase", str(cfg)]) == 0
    shutil.rmtree(run_dir(cfg) / "adapter")
    resolved = run_dir(cfg) / "config.resolved.yaml"
    before = resolved.read_bytes(), resolved.stat().st_mtime_ns
    with pytest.raises(UserError, match="different training settings") as err:
        train_main(["--phase", str(cfg), "train.learning_rate=1e-3"])
    assert "train.learning_rate: 0.005 -> 0.001" in err.value.what and "RESUME_CHANGED=1" in err.value.fix
    assert (resolved.read_bytes(), resolved.stat().st_mtime_ns) == before  # a refused resume rewrites nothing
    env.setenv("RESUME_CHANGED", "1")
    assert train_main(["--phase", str(cfg), "train.learning_rate=1e-3"]) == 0
    assert load_config(resolved).train.learning_rate == 1e-3


def test_packing_checkpointing_and_rslora_train(tmp_path, tiny_base, memorised_data, env):
    cfg = write_config(tmp_path, tiny_base, memorised_data, data={"packing": True, "max_seq_len": 128},
                       train={"max_steps": 2, "gradient_checkpointing": True, "micro_batch_size": 2},
                       lora={"rslora": True, "rank_pattern": {"o_proj": 4}, "dropout": 0.1})
    assert train_main(["--phase", str(cfg)]) == 0
    adapter_config = json.loads((run_dir(cfg) / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_rslora"] is True and adapter_config["rank_pattern"] == {"o_proj": 4}
    assert all(row["loss"] == row["loss"] for row in read_log(run_dir(cfg) / "train_log.jsonl"))  # no NaN
