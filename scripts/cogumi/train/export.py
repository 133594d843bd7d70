"""What a finished run leaves: the adapter folder (written then renamed, safe on a full disk), the check that a
run already finished, and the one-screen summary."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cogumi.core.config import PhaseConfig
from cogumi.core.fsutil import free_bytes, move_aside
from cogumi.core.manifest import sha256_json
from cogumi.train.checkpoints import DiskStop, list_complete, looks_like_disk_full
from cogumi.train.model import Runtime
from cogumi.train.trainer import ADAPTER_WEIGHTS, Result, training_hash
from cogumi.train.trainlog import TRAIN_LOG

log = logging.getLogger(__name__)


def export_adapter(config: PhaseConfig, model, base, runtime: Runtime, result: Result) -> Path:
    """adapter/ = peft's adapter_config.json + adapter_model.safetensors + manifest.json, written then renamed.

    An adapter already there (an earlier finished run) is moved aside, never overwritten. A full disk stops with
    DiskStop (exit 3) and removes the temporary folder: nothing half-written stays behind, and `make train` again
    exports from the final checkpoint once there is room (ISSUES_LOG B20).
    """
    final = config.adapter_dir
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():  # only this function makes it: the leftover of a killed export, never a user's file
        shutil.rmtree(tmp)
    try:
        _write_adapter(tmp, config, model, base, runtime, result)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the error that matters is `err`; the cleanup is best effort
        if isinstance(err, Exception) and looks_like_disk_full(err, free_bytes(final.parent), 0):
            raise DiskStop(f"the disk filled while exporting the final adapter; nothing was kept ({err})",
                           where=str(final.parent.absolute()),
                           fix="free some space on that filesystem, then run the same `make train` again: it "
                               "exports from the final checkpoint without training again") from err
        raise
    if final.exists():
        aside = move_aside(final, "old")
        log.info("moved the previous adapter aside to %s", aside)
    tmp.rename(final)
    return final


def _write_adapter(folder: Path, config: PhaseConfig, model, base, runtime: Runtime, result: Result) -> None:
    from cogumi.core.manifest import sha256_file, write_manifest
    from cogumi.train.model import lora_record

    model.save_pretrained(folder, safe_serialization=True)
    write_manifest(folder, "adapter", base_model=config.base_model, base_path=str(base.path),
                   base_fingerprint=base.fingerprint, dtype=str(runtime.dtype).replace("torch.", ""),
                   config_hash=sha256_json(config.to_dict()), training_hash=training_hash(config),
                   adapter_hash=sha256_file(folder / ADAPTER_WEIGHTS), lora=lora_record(config.lora),
                   trained_on_quantized=False, allowed_unvalidated=base.unvalidated_warning, steps=result.steps,
                   final_loss=result.final_loss, eval_loss=result.eval_loss, eval_step=result.eval_step)


def finished_adapter(config: PhaseConfig, total_steps: int) -> dict | None:
    """The manifest of an adapter this exact run already finished, so `make train` again is a no-op."""
    from cogumi.core.manifest import read_manifest

    manifest = read_manifest(config.adapter_dir) if config.adapter_dir.is_dir() else None
    if manifest and manifest.get("training_hash") == training_hash(config) and manifest.get("steps") == total_steps:
        return manifest
    return None


def next_command(phase: str, overrides: list[str]) -> str:
    """The merge command for this very run: the same PHASE and the same overrides (a changed `name` included)."""
    args = f' ARGS="{" ".join(overrides)}"' if overrides else ""
    return f"make merge PHASE={phase}{args}"


def _eval_text(config: PhaseConfig, result: Result) -> str:
    if result.eval_loss is not None:
        return f"   eval_loss {result.eval_loss:.4f} (held out, step {result.eval_step})"
    has_eval = config.data.eval_fraction > 0 or config.data.eval_path is not None
    return "   eval_loss n/a" + ("" if has_eval else " (no held-out set: data.eval_fraction, data.eval_path)")


def summary(config: PhaseConfig, result: Result, adapter: Path, plot: Path | None, next_step: str) -> str:
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
        f"  final loss   {loss}" + _eval_text(config, result),
        f"  tokens/s     {tps} real (non-pad)   MFU {mfu}   padding {padding}",
        f"  memory       peak {result.peak_mem_gib:.2f} GiB   wall {result.seconds:.0f} s",
        f"  adapter      {adapter}",
        f"  checkpoints  {checkpoints}",
        f"  log          {run_dir / TRAIN_LOG}",
    ]
    if plot is not None:
        lines.append(f"  loss curve   {plot}")
    lines.append(f"  next         {next_step}")
    return "\n".join(lines)
