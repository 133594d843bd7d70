"""Helpers the trainer tests share (test_train, test_ddp): a tiny phase config under tmp_path, its run folder, and
adapter weights to compare. Their fixtures (tiny_base, memorised_data, one_thread) are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors.torch import load_file

from cogumi.core.config import load_config
from cogumi.core.paths import SCRIPTS_DIR

TRAIN_SCRIPT = SCRIPTS_DIR / "train_phase1a_fullprecision.py"


def write_config(tmp_path: Path, base, data_path: Path, *, name: str = "tinyrun", root: str = "out",
                 **sections) -> Path:
    """A tiny phase config whose outputs all land under tmp_path (never the repo's checkpoints/)."""
    config = {
        "name": name, "base_model": str(base), "output_root": str(tmp_path / root),
        "data": {"train_path": str(data_path), "max_seq_len": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3,
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "log_every": 1, "seed": 7,
                  "gradient_checkpointing": False},
        "checkpoints": {"save_steps": 2, "keep_last": 2},
        "disk": {"monitor": False, "margin_mb": 1},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{name}-{root}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_dir(config_path: Path) -> Path:
    return load_config(config_path).run_dir


def adapter_weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
