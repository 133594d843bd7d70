"""Preflight sizing, the checkpoint estimate, and the sidecar's lifetime (ISSUES_LOG O3)."""

from __future__ import annotations

import logging
import os
import time

import pytest
from tmpfs_util import fill_file

from cogumi.core.config import CheckpointConfig, DiskConfig, PhaseConfig
from cogumi.core.errors import UserError
from cogumi.train.checkpoints import COMPLETE, checkpoint_path
from cogumi.train.disk import estimate_checkpoint_bytes, monitor_command, preflight, sidecar

MB = 1024 * 1024
# LoRA on all linear layers of Llama-3.1-8B: per layer r * (in + out) for q, k, v, o, gate, up, down.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 4096, 14336, 32, 32, 8
KV = HIDDEN // HEADS * KV_HEADS
PER_RANK_8B = LAYERS * (2 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + KV) + 3 * (HIDDEN + INTER))


@pytest.fixture()
def fs(tmpfs):
    return tmpfs(16 * MB)


def config_on(root, keep_last=2, margin_mb=1, **disk):
    return PhaseConfig(name="run", output_root=str(root), checkpoints=CheckpointConfig(save_steps=10,
                       keep_last=keep_last), disk=DiskConfig(margin_mb=margin_mb, **disk))


def test_estimate_matches_the_8b_table():
    assert PER_RANK_8B == 2_621_440  # 41.9 M trainable parameters at r=16, as peft reports for Llama-3.1-8B
    one = estimate_checkpoint_bytes(16 * PER_RANK_8B)
    assert 12 * 16 * PER_RANK_8B < one < 12 * 16 * PER_RANK_8B * 1.03 + 2 * MB  # adapter + 2 moments, fp32
    assert estimate_checkpoint_bytes(1000, param_bytes=2) < estimate_checkpoint_bytes(1000)


def test_per_rank_count_is_what_peft_trains_on_the_real_shapes():
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # One decoder layer of the real widths (all 32 are identical), on the meta device: shapes only, seconds.
    shape = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(shape)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters()) + (LAYERS - 1) * per_layer
    assert total == 8_030_261_248  # 16.06 GB in bf16: the merged output
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) * LAYERS == 4 * PER_RANK_8B


def test_preflight_refuses_with_the_numbers_and_what_to_free(fs):
    config = config_on(fs)
    aside = checkpoint_path(config.run_dir, 900)
    aside.mkdir(parents=True)
    fill_file(aside / "adapter.bin", 2 * MB)
    aside.rename(config.run_dir / "checkpoint-900.stale-20260101-000000")
    with pytest.raises(UserError) as info:
        preflight(config, checkpoint_bytes_estimate=4 * MB, merged_bytes_estimate=4 * MB)
    what = info.value.what
    assert "not enough disk" in what and "3 checkpoints x 4.19 MB" in what and "merged model 4.19 MB" in what
    assert "checkpoint-900.stale-" in info.value.fix and "free at least" in info.value.fix
    preflight(config, checkpoint_bytes_estimate=2 * MB, merged_bytes_estimate=2 * MB)  # 6 + 2 + 1 MiB fits


def test_preflight_counts_existing_checkpoints_and_uses_the_measured_size(fs):
    config = config_on(fs, keep_last=2)
    for step in (10, 20):
        folder = checkpoint_path(config.run_dir, step)
        folder.mkdir(parents=True)
        fill_file(folder / "adapter.bin", 3 * MB)
        (folder / COMPLETE).write_text("{}")
    # 6 MB on disk, ~9 MB free: one more 3 MB checkpoint + 4 MB merged + 1 MiB fits on resume, although a fresh
    # estimate of three checkpoints would not; a tiny estimate does not override the measured 3 MB.
    preflight(config, checkpoint_bytes_estimate=1, merged_bytes_estimate=4 * MB)
    with pytest.raises(UserError, match="measured; 2 already on disk"):
        preflight(config, checkpoint_bytes_estimate=1, merged_bytes_estimate=6 * MB)


def test_preflight_warns_above_the_warn_threshold(fs, caplog):
    fill_file(fs / "other", 11 * MB)  # ~69 % used
    with caplog.at_level(logging.WARNING, logger="cogumi.train.disk"):
        preflight(config_on(fs), checkpoint_bytes_estimate=MB, merged_bytes_estimate=MB)
    assert any("% used (warn at 60%)" in r.getMessage() for r in caplog.records)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return not fh.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return False


def test_sidecar_runs_during_the_block_and_stops_however_it_ends(tmp_path):
    config = config_on(tmp_path, interval=600)
    command = monitor_command(config)
    assert command[command.index("--parent-pid") + 1] == str(os.getpid())
    assert command[command.index("--keep") + 1] == "2" and str(config.run_dir) in command
    log_file = config.run_dir / "monitor_disk.log"
    with sidecar(config) as proc:
        assert proc is not None and alive(proc.pid)
        deadline = time.monotonic() + 20
        while "OK" not in (log_file.read_text() if log_file.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)  # the first reading is out: its SIGTERM handler is installed
    assert proc.returncode == 0 and not alive(proc.pid)  # stopped by SIGTERM, cleanly
    with pytest.raises(RuntimeError), sidecar(config) as proc:
        raise RuntimeError("the trainer crashed")
    assert not alive(proc.pid)
    with pytest.raises(KeyboardInterrupt), sidecar(config) as proc:
        raise KeyboardInterrupt
    assert not alive(proc.pid)
    with sidecar(config_on(tmp_path, monitor=False)) as proc:
        assert proc is None
