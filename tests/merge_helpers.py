"""Helpers shared by the merge tests: a random peft adapter with the trainer's manifest, a merge job, and the
check that a refused or stopped merge left nothing behind."""

from __future__ import annotations

from pathlib import Path

import torch

from cogumi.core.manifest import sha256_file, weights_fingerprint, write_manifest
from cogumi.merge.stream import MergeJob


def make_adapter(base_dir: Path, adapter_dir: Path, *, base_name: str | None = None, seed: int = 1,
                 model=None, magnitude: float = 0.1, **lora_kwargs) -> Path:
    """A peft adapter on `base_dir` with random non-zero A and B (standard deviation `magnitude`: how much the
    adapter moves the logits), plus the manifest the trainer writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # B starts at zero in peft: give every LoRA tensor values so the merge matters
                param.copy_(torch.randn(param.shape, generator=generator) * magnitude)
    peft_model.peft_config["default"].base_model_name_or_path = base_name or str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    write_manifest(adapter_dir, "adapter", base_model=base_name or str(base_dir), base_path=str(base_dir),
                   base_fingerprint=weights_fingerprint(base_dir), dtype="float32",
                   lora={"r": lora["r"], "alpha": lora["lora_alpha"]}, trained_on_quantized=False,
                   adapter_hash=sha256_file(adapter_dir / "adapter_model.safetensors"))
    return adapter_dir


def job(base_dir: Path, adapter_dir: Path, out_dir: Path, **kwargs) -> MergeJob:
    return MergeJob(base_model=str(base_dir), adapter_dir=adapter_dir, out_dir=out_dir,
                    verify=kwargs.pop("verify", False), margin_bytes=kwargs.pop("margin_bytes", 0), **kwargs)


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "a temporary folder was left behind"
