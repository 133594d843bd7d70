"""What a finished run leaves: the adapter with its manifest, the no-op check for a finished run, the summary."""

from __future__ import annotations

import logging
from pathlib import Path

from cogumi.core.config import PhaseConfig
from cogumi.core.fsutil import move_aside
from cogumi.core.manifest import sha256_json
from cogumi.train.checkpoints import list_complete
from cogumi.train.model import Runtime
from cogumi.train.trainer import ADAPTER_WEIGHTS, Result, training_hash
from cogumi.train.trainlog import TRAIN_LOG

log = logging.getLogger(__name__)


def export_adapter(config: PhaseConfig, model, base, runtime: Runtime, result: Result) -> Path:
    """adapter/ = peft's adapter_config.json + adapter_model.safetensors + manifest.json, written then renamed.

    An adapter already there (an earlier finished run) is moved aside, never overwritten.
    """
    from cogumi.core.manifest import sha256_file, write_manifest
    from cogumi.train.model import lora_record

    final = config.adapter_dir
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        move_aside(tmp, "incomplete")
    model.save_pretrained(tmp, safe_serialization=True)
    write_manifest(tmp, "adapter", base_model=config.base_model, base_path=str(base.path),
                   base_fingerprint=base.fingerprint, dtype=str(runtime.dtype).replace("torch.", ""),
                   config_hash=sha256_json(config.to_dict()), training_hash=training_hash(config),
                   adapter_hash=sha256_file(tmp / ADAPTER_WEIGHTS), lora=lora_record(config.lora),
                   trained_on_quantized=False, force_warning=base.force_warning, steps=result.steps,
                   final_loss=result.final_loss)
    if final.exists():
        aside = move_aside(final, "old")
        log.info("moved the previous adapter aside to %s", aside)
    tmp.rename(final)
    return final


def finished_adapter(config: PhaseConfig, total_steps: int) -> dict | None:
    """The manifest of an adapter this exact run already finished, so `make train` again is a no-op."""
    from cogumi.core.manifest import read_manifest

    manifest = read_manifest(config.adapter_dir) if config.adapter_dir.is_dir() else None
    if manifest and manifest.get("training_hash") == training_hash(config) and manifest.get("steps") == total_steps:
        return manifest
    return None


def summary(config: PhaseConfig, result: Result, adapter: Path, plot: Path | None) -> str:
    """The one-screen report printed at the end of a run."""
    run_dir = config.run_dir
    checkpoints = ", ".join(p.name for _, p in list_complete(run_dir)) or "none"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    tps = f"{result.tokens_per_s:,.0f}" if result.tokens_per_s is not None else "n/a"
    mfu = f"{100 * result.mfu:.1f} %" if result.mfu is not None else "n/a (no GPU peak known)"
    padding = f"{100 * result.padding:.1f} %" if result.padding is not None else "n/a"
    lines = [
        f"== {config.name}: training done ==",
        f"  steps        {result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        f"  final loss   {loss}",
        f"  tokens/s     {tps} real (non-pad)   MFU {mfu}   padding {padding}",
        f"  memory       peak {result.peak_mem_gib:.2f} GiB   wall {result.seconds:.0f} s",
        f"  adapter      {adapter}",
        f"  checkpoints  {checkpoints}",
        f"  log          {run_dir / TRAIN_LOG}",
    ]
    if plot is not None:
        lines.append(f"  loss curve   {plot}")
    lines.append(f"  next         make merge PHASE={config.name.removeprefix('phase')}")
    return "\n".join(lines)
