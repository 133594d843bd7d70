"""A plain PyTorch LoRA training loop whose resume is exact.

Not the HF Trainer: every piece of state a resumed run needs (LoRA weights, AdamW moments, scheduler, the
torch/numpy/python RNGs that dropout draws from, the data position, the step) is saved by this module in one
checkpoint folder, through cogumi.checkpoints (COMPLETE marker last, room check first, verified retention).
A run killed at any moment and started again ends with the same adapter as an uninterrupted run with the seed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogumi.checkpoints import latest_complete, list_complete, measured_checkpoint_size, save_checkpoint
from cogumi.config import PhaseConfig
from cogumi.data import Batches
from cogumi.errors import UserError
from cogumi.fsutil import atomic_write_text, move_aside
from cogumi.manifest import sha256_json
from cogumi.model import Runtime, trainable_parameters
from cogumi.step import train_step

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_LOG = "train_log.jsonl"
# Keys that do not change what is trained: a resumed run may change them freely.
_NOT_TRAINING = {"train": {"log_every", "device", "liger", "attention", "gradient_checkpointing"}}


@dataclass(frozen=True)
class Plan:
    """The batch arithmetic, fixed before the loop."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    batches_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def effective_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"batch: micro-batch {self.micro_batch_size} x accumulation {self.grad_accum} x processes "
                f"{self.world_size} = effective batch {self.effective_batch}; {self.batches_per_epoch} micro-batches "
                f"per epoch per process; {self.total_steps} optimizer steps ({self.warmup_steps} warm-up)")


@dataclass
class Result:
    steps: int
    final_loss: float | None
    tokens_per_s: float | None
    peak_mem_gib: float
    seconds: float
    resumed_from: str | None


def make_plan(config: PhaseConfig, batches: Batches, world_size: int) -> Plan:
    t = config.train
    if t.max_steps is not None:
        total = t.max_steps
    else:
        total = math.ceil(t.epochs * batches.batches_per_epoch / t.grad_accum)
    if total < 1:
        raise UserError("this run would take 0 optimizer steps", where="train.max_steps / train.epochs",
                        fix="set train.max_steps or raise train.epochs")
    return Plan(t.micro_batch_size, t.grad_accum, world_size, batches.batches_per_epoch, total,
                math.ceil(t.warmup_ratio * total))


def training_hash(config: PhaseConfig) -> str:
    """Identity of what is trained: a checkpoint is only resumed by a run with the same one."""
    values = config.to_dict()
    picked = {k: values[k] for k in ("base_model", "data", "lora", "train")}
    picked["train"] = {k: v for k, v in picked["train"].items() if k not in _NOT_TRAINING["train"]}
    return sha256_json(picked)


# ---------------------------------------------------------------- run folder and resume choice


def prepare_run_dir(config: PhaseConfig, *, fresh: bool) -> Path | None:
    """The checkpoint to resume from (the newest COMPLETE one), or None; RESUME=0 moves an old run aside first."""
    run_dir = config.run_dir
    if fresh and run_dir.exists():
        aside = move_aside(run_dir, "old")
        log.info("RESUME=0: moved the previous run %s aside to %s (nothing deleted)", run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_complete(run_dir)
    ignored = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()
                     and p not in {path for _, path in list_complete(run_dir)})
    if ignored:
        log.warning("ignoring %s: no COMPLETE marker (an interrupted save)", ", ".join(ignored))
    if checkpoint is not None:
        log.info("resume: continuing from %s (the newest complete checkpoint; RESUME=0 starts fresh)", checkpoint)
    return checkpoint


# ---------------------------------------------------------------- RNG and state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Owns the optimizer, scheduler and step counter; `fit()` runs the loop to plan.total_steps."""

    def __init__(self, config: PhaseConfig, model, batches: Batches, runtime: Runtime, plan: Plan,
                 *, checkpoint_estimate: int):
        from transformers import get_scheduler

        self.config, self.model, self.batches, self.runtime, self.plan = config, model, batches, runtime, plan
        self.params = trainable_parameters(model)
        t = config.train
        # Fused AdamW keeps the whole update in one kernel per parameter group on a GPU.
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                           fused=runtime.device.type == "cuda")
        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=plan.warmup_steps,
                                       num_training_steps=plan.total_steps)
        self.step = 0
        self.resumed_from: str | None = None
        self.checkpoint_estimate = checkpoint_estimate
        self.log_path = config.run_dir / TRAIN_LOG
        self.last_loss: float | None = None
        self.last_tps: float | None = None
        seed_everything(t.seed)

    # -- checkpoints

    def _write_checkpoint(self, folder: Path) -> None:
        self.model.save_pretrained(folder / "adapter", safe_serialization=True)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict(), "rng": rng_state(),
                 "training_hash": training_hash(self.config), "total_steps": self.plan.total_steps}
        torch.save(state, folder / STATE_FILE)

    def save(self) -> Path:
        ck = self.config.checkpoints
        return save_checkpoint(self.config.run_dir, self.step, self._write_checkpoint, keep_last=ck.keep_last,
                               margin_bytes=self.config.disk.margin_mb * 1024 * 1024,
                               expected_bytes=measured_checkpoint_size(self.config.run_dir) or self.checkpoint_estimate)

    def resume(self, checkpoint: Path, *, force: bool = False) -> None:
        """Restore everything a checkpoint holds; the next step is exactly the one the saved run would take."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
        self._check_compatible(state, checkpoint, force)
        weights = load_file(checkpoint / "adapter" / ADAPTER_WEIGHTS, device=str(self.runtime.device))
        result = set_peft_model_state_dict(self.model, weights)
        missing = [k for k in result.unexpected_keys if "lora_" in k]
        if missing:
            raise UserError(f"{checkpoint} does not fit this LoRA ({len(missing)} unexpected tensors)",
                            where=str(checkpoint), fix="start fresh with RESUME=0 (the old run is moved aside)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.resumed_from = checkpoint.name
        truncate_log(self.log_path, self.step)

    def _check_compatible(self, state: dict, checkpoint: Path, force: bool) -> None:
        same = state.get("training_hash") == training_hash(self.config)
        if same and state.get("total_steps") == self.plan.total_steps:
            return
        message = (f"{checkpoint} was saved by a run with different training settings (data, LoRA, train.* or "
                   "the step count changed)")
        if not force:
            raise UserError(message, where=str(checkpoint),
                            fix="undo the change, or RESUME=0 to start fresh (the old run is moved aside), or "
                                "FORCE=1 to continue anyway")
        log.warning("FORCE=1: %s; continuing from it anyway", message)

    # -- the loop

    def fit(self) -> Result:
        from tqdm.auto import tqdm

        t = self.config.train
        start, window = time.perf_counter(), _Window()
        bar = tqdm(total=self.plan.total_steps, initial=self.step, desc=self.config.name, unit="step",
                   disable=not self.runtime.is_main, dynamic_ncols=True)
        self.model.train()
        while self.step < self.plan.total_steps:
            loss, tokens = self._optimizer_step(t.max_grad_norm)
            self.step += 1
            window.add(loss, tokens)
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == self.plan.total_steps:
                self._log(window.close())
                bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{self.last_tps:.0f}")
            if self.step % self.config.checkpoints.save_steps == 0 or self.step == self.plan.total_steps:
                self.save()
        bar.close()
        return Result(self.step, self.last_loss, self.last_tps, peak_mem_gib(self.runtime.device),
                      time.perf_counter() - start, self.resumed_from)

    def _optimizer_step(self, max_grad_norm: float) -> tuple[torch.Tensor, int]:
        """grad_accum micro-batches through cogumi.step.train_step, clip, step; returns (summed loss, tokens)."""
        scale = 1.0 / self.plan.grad_accum
        total = torch.zeros((), device=self.runtime.device)
        tokens = 0
        for _ in range(self.plan.grad_accum):
            batch, n = next(self.batches)
            batch = {k: v.to(self.runtime.device, non_blocking=True) for k, v in batch.items()}
            total += train_step(self.model, batch, scale) * scale  # no .item(): the GPU never waits for the host
            tokens += n
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens

    def _log(self, window: dict) -> None:
        self.last_loss, self.last_tps = window["loss"], window["tokens_per_s"]
        row = {"step": self.step, "loss": round(window["loss"], 6), "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": round(window["tokens_per_s"], 1),
               "peak_mem_gib": round(peak_mem_gib(self.runtime.device), 3)}
        if self.runtime.is_main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            log.debug("step %d: %s", self.step, row)


class _Window:
    """Loss and throughput since the last log line; the one host sync per log interval happens in close()."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.losses, self.tokens, self.since = [], 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def close(self) -> dict:
        loss = torch.stack(self.losses).float().mean().item()
        seconds = max(time.perf_counter() - self.since, 1e-9)
        out = {"loss": loss, "tokens_per_s": self.tokens / seconds}
        self._reset()
        return out


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from, so each step appears once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- outputs


def export_adapter(config: PhaseConfig, model, base, runtime: Runtime, result: Result) -> Path:
    """adapter/ = peft's adapter_config.json + adapter_model.safetensors + manifest.json, written then renamed.

    An adapter already there (an earlier finished run) is moved aside, never overwritten.
    """
    from cogumi.manifest import sha256_file, write_manifest
    from cogumi.model import lora_record

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
    from cogumi.manifest import read_manifest

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
    lines = [
        f"== {config.name}: training done ==",
        f"  steps        {result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        f"  final loss   {loss}",
        f"  tokens/s     {tps}   peak memory {result.peak_mem_gib:.2f} GiB   wall {result.seconds:.0f} s",
        f"  adapter      {adapter}",
        f"  checkpoints  {checkpoints}",
        f"  log          {run_dir / TRAIN_LOG}",
    ]
    if plot is not None:
        lines.append(f"  loss curve   {plot}")
    lines.append(f"  next         make merge PHASE={config.name.removeprefix('phase')}")
    return "\n".join(lines)
