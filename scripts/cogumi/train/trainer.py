"""A plain PyTorch LoRA training loop whose resume is exact.

Not the HF Trainer: every piece of state a resumed run needs (LoRA weights, AdamW moments, scheduler, the
torch/numpy/python RNGs that dropout draws from, the data position, the step) is saved by this module in one
checkpoint folder, through cogumi.train.checkpoints (COMPLETE marker last, room check first, verified retention).
A run killed at any moment and started again ends with the same adapter as an uninterrupted run with the seed.

With several processes (torchrun, docs/MULTI_GPU.md) the model is wrapped in DistributedDataParallel, gradients are
all-reduced once per optimizer step, rank 0 alone writes checkpoints, logs and the adapter, and each rank's RNG state
is saved beside the others (rng-rank<k>.pt), so the resume is exact with N processes too.
"""

# long-file: the loop and every piece of state its exact resume restores belong together (eval: train/heldout.py)

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogumi.core.config import PhaseConfig
from cogumi.core.errors import UserError
from cogumi.core.fsutil import move_aside
from cogumi.core.manifest import sha256_json
from cogumi.core.tracking import Tracker, no_tracker
from cogumi.train import distributed
from cogumi.train.checkpoints import (
    latest_complete,
    list_complete,
    measured_checkpoint_size,
    require_saved_files,
    save_checkpoint,
)
from cogumi.train.data import BatchCounts, Batches
from cogumi.train.flops import matmul_sizes, peak_tflops
from cogumi.train.heldout import eval_row
from cogumi.train.layout import Layout, write_layout
from cogumi.train.model import Runtime, trainable_parameters
from cogumi.train.packed_attention import batch_to_device, require_packed_attention
from cogumi.train.step import accumulate, token_weights
from cogumi.train.trainlog import TRAIN_LOG, append_row, truncate_log

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RNG_FILE = "rng-rank{rank}.pt"
# Keys that do not change what is trained: a resumed run may change them freely. The split of the effective batch
# into micro-batch x accumulation is one of them (the hash records the effective batch instead); memory and speed
# settings are others.
_NOT_TRAINING = {"train": {"log_every", "report_to", "device", "liger", "attention", "gradient_checkpointing",
                           "checkpoint_layers", "memory_budget_gib", "micro_batch_size", "grad_accum", "eval_every"},
                 "data": {"eval_path"}}  # what eval_loss is measured on does not change the training
# Keys added after checkpoints already existed: left out of the hash at their defaults, so such a checkpoint still
# resumes (B53). Any other value changes what is trained (eval_fraction takes examples out) and is in the hash.
_LEFT_OUT_AT_DEFAULT = {"data": {"format": "auto", "eval_fraction": 0.0, "columns": {}, "roles": {}}}


@dataclass(frozen=True)
class TrainPlan:
    """The step count, fixed before the model loads: it depends on the data size and the effective batch only."""

    effective_batch: int
    rows: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tokens_per_step: int  # mean real tokens per optimizer step (rows x their mean length)
    packed: bool = False

    def describe(self) -> str:
        what = "packed rows" if self.packed else "examples"
        left = self.rows - self.steps_per_epoch * self.effective_batch
        return (f"{self.rows} training {what}, {self.effective_batch} per optimizer step (~{self.tokens_per_step:,} "
                f"tokens): {self.steps_per_epoch} steps per epoch ({left} {what} left out of each epoch, a different "
                f"few each time); {self.total_steps} optimizer steps ({self.warmup_steps} warm-up)")


@dataclass
class Result:
    steps: int
    final_loss: float | None
    tokens_per_s: float | None  # real (non-pad) tokens per second, over the whole run
    peak_mem_gib: float
    seconds: float
    resumed_from: str | None
    mfu: float | None = None
    padding: float | None = None
    eval_loss: float | None = None  # the held-out loss at the last step; None without a held-out set
    eval_step: int | None = None


def effective_batch(config: PhaseConfig) -> int:
    """Examples per optimizer step: micro_batch_size x grad_accum as configured, on any number of processes."""
    return config.train.micro_batch_size * config.train.grad_accum


def make_plan(config: PhaseConfig, rows: int, tokens: int = 0) -> TrainPlan:
    """The step count for `rows` training items (examples, or packed rows) holding `tokens` real tokens."""
    t = config.train
    eff = effective_batch(config)
    per_epoch = rows // eff
    if per_epoch < 1:
        raise UserError(f"{rows} training rows are fewer than one effective batch ({eff} = train.micro_batch_size "
                        f"{t.micro_batch_size} x train.grad_accum {t.grad_accum})", where="data.train_path",
                        fix="add data, or lower train.grad_accum")
    total = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * per_epoch)
    if total < 1:
        raise UserError("this run would take 0 optimizer steps", where="train.max_steps / train.epochs",
                        fix="set train.max_steps or raise train.epochs")
    return TrainPlan(eff, rows, per_epoch, total, math.ceil(t.warmup_ratio * total), round(tokens / rows * eff),
                config.data.packing)


def training_settings(config: PhaseConfig) -> dict:
    """What is trained: base, data, LoRA and the train.* keys that change the result (not speed or memory)."""
    values = config.to_dict()
    picked = {k: values[k] for k in ("base_model", "data", "lora", "train")}
    for section in ("data", "train"):
        defaults = _LEFT_OUT_AT_DEFAULT.get(section, {})
        picked[section] = {k: v for k, v in picked[section].items() if k not in _NOT_TRAINING[section]
                           and not (k in defaults and v == defaults[k])}
    picked["train"]["effective_batch"] = effective_batch(config)
    return picked


def training_hash(config: PhaseConfig) -> str:
    """Identity of what is trained: a checkpoint is only resumed by a run with the same one."""
    return sha256_json(training_settings(config))


def changed_keys(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings dicts, e.g. ['train.learning_rate: 0.0002 -> 0.001']."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------- run folder and resume choice


def choose_resume(config: PhaseConfig, *, fresh: bool) -> Path | None:
    """The checkpoint to resume from (the newest COMPLETE one), or None. Changes nothing on disk.

    RESUME=0 resumes nothing; the old run is moved aside later, by claim_run_dir, once every check passed.
    """
    run_dir = config.run_dir
    if fresh or not run_dir.is_dir():
        return None
    checkpoint = latest_complete(run_dir)
    complete = {path for _, path in list_complete(run_dir)}
    ignored = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir() and p not in complete)
    if ignored:
        log.warning("ignoring %s: no COMPLETE marker (an interrupted save)", ", ".join(ignored))
    if checkpoint is not None:
        require_saved_files(checkpoint, (f"adapter/{ADAPTER_WEIGHTS}", STATE_FILE))  # what resume reads
        log.info("resume: continuing from %s (the newest complete checkpoint; RESUME=0 starts fresh)", checkpoint)
    return checkpoint



def claim_run_dir(config: PhaseConfig, *, fresh: bool, resuming: bool) -> Path:
    """The run folder, ready for writing; RESUME=0 moves the previous one aside first (nothing is deleted).

    Called after every check passed, so a refused run (exit 2) has moved nothing (ISSUES_LOG B24). A run that
    starts at step 0 in a folder whose earlier attempt stopped before its first checkpoint drops that attempt's log
    rows, so each step is logged once.
    """
    run_dir = config.run_dir
    if fresh and run_dir.exists():
        aside = move_aside(run_dir, "old")
        log.info("RESUME=0: moved the previous run %s aside to %s (nothing deleted)", run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        truncate_log(run_dir / TRAIN_LOG, 0)
    return run_dir


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

    def __init__(self, config: PhaseConfig, model, batches: Batches, runtime: Runtime, plan: TrainPlan, layout: Layout,
                 *, checkpoint_estimate: int, held_out: list | None = None):
        from transformers import get_scheduler

        self.config, self.model, self.batches, self.runtime = config, model, batches, runtime
        self.plan, self.layout = plan, layout
        self.params = trainable_parameters(model)
        if batches.collate.packed:
            require_packed_attention(model)  # never let packed examples attend to each other
        self.engine, self.no_sync = wrap_for_distributed(model, runtime)
        self.sizes = matmul_sizes(model)  # the FLOP count behind MFU, the same as scripts/bench/bench_train.py's
        gpu = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None
        self.peak_tflops = peak_tflops(gpu)
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
        self.run_counts, self.run_flops = BatchCounts(), 0.0  # this process's, for the summary
        self.held_out = held_out or []
        self.eval_every = t.eval_every or config.checkpoints.save_steps
        self.last_eval: tuple[int, float] | None = None
        # Per-rank seeds: dropout on two ranks must not draw the same masks. Rank 0 keeps the one-process stream.
        seed_everything(t.seed + runtime.rank)

    # -- checkpoints

    def _write_checkpoint(self, folder: Path, rng_states: list[dict]) -> None:
        self.model.save_pretrained(folder / "adapter", safe_serialization=True)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "data": self.batches.state_dict(),
                 "training_hash": training_hash(self.config),
                 "training_settings": training_settings(self.config), "total_steps": self.plan.total_steps,
                 "world_size": self.layout.world_size}
        torch.save(state, folder / STATE_FILE)
        for rank, rng in enumerate(rng_states):
            torch.save(rng, folder / RNG_FILE.format(rank=rank))
        write_layout(folder, self.layout)

    def save(self) -> Path:
        """Every rank hands its RNG state to rank 0, which writes the checkpoint; all ranks get its path or error.

        The LoRA weights and AdamW moments are the same on every rank (DDP averages the gradients before the step),
        so rank 0's copy is the checkpoint. The broadcast at the end is the barrier: no rank runs ahead of a save
        that failed (DiskStop ends every rank with exit code 3).
        """
        rng_states = distributed.gather(rng_state())
        ck = self.config.checkpoints

        def write() -> Path:
            return save_checkpoint(self.config.run_dir, self.step, lambda folder: self._write_checkpoint(
                folder, rng_states), keep_last=ck.keep_last, margin_bytes=self.config.disk.margin_mb * 1024 * 1024,
                expected_bytes=measured_checkpoint_size(self.config.run_dir) or self.checkpoint_estimate)

        return distributed.on_main(write)

    def resume(self, checkpoint: Path, *, allow_changed: bool = False) -> None:
        """Restore everything a checkpoint holds; the next step is exactly the one the saved run would take.

        Every rank reads the same complete checkpoint (rank 0 chose it and broadcast the path).
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
        self._check_compatible(state, checkpoint, allow_changed)
        weights = load_file(checkpoint / "adapter" / ADAPTER_WEIGHTS, device=str(self.runtime.device))
        result = set_peft_model_state_dict(self.model, weights)
        missing = [k for k in result.unexpected_keys if "lora_" in k]
        if missing:
            raise UserError(f"{checkpoint} does not fit this LoRA ({len(missing)} unexpected tensors)",
                            where=str(checkpoint), fix="start fresh with RESUME=0 (the old run is moved aside)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.step = state["step"]
        self._restore_rng(checkpoint, state)
        self.resumed_from = checkpoint.name
        distributed.on_main(truncate_log, self.log_path, self.step)

    def _restore_rng(self, checkpoint: Path, state: dict) -> None:
        """This rank's saved RNG state; with another process count there is none to match, so a fresh seed."""
        rank, saved_world = self.runtime.rank, state.get("world_size", 1)
        path = checkpoint / RNG_FILE.format(rank=rank)
        if saved_world == self.layout.world_size and path.is_file():
            set_rng_state(torch.load(path, map_location="cpu", weights_only=False))
        elif saved_world == self.layout.world_size and "rng" in state:  # a checkpoint from before rng-rank<k>.pt
            set_rng_state(state["rng"])
        else:
            seed_everything(self.config.train.seed + 1000 * self.step + rank)
            if self.runtime.is_main:
                log.warning("resume: %s was saved by %d process(es), this run has %d: the data position and the "
                            "weights carry over exactly, the random streams (LoRA dropout) start afresh",
                            checkpoint.name, saved_world, self.layout.world_size)

    def _check_compatible(self, state: dict, checkpoint: Path, allow_changed: bool) -> None:
        same = state.get("training_hash") == training_hash(self.config)
        if same and state.get("total_steps") == self.plan.total_steps:
            return
        message = f"{checkpoint} was saved by a run with different training settings"
        keys = changed_keys(state["training_settings"], training_settings(self.config)) \
            if "training_settings" in state else []
        if state.get("total_steps") != self.plan.total_steps:
            keys.append(f"total steps: {state.get('total_steps')} -> {self.plan.total_steps}")
        message += ": " + ("; ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                           if keys else "data, LoRA, train.*, the effective batch or the step count changed "
                                        "(this checkpoint predates the list of keys)")
        if not allow_changed:
            raise UserError(message, where=str(checkpoint),
                            fix="undo the change, or RESUME=0 to start fresh (the old run is moved aside), or "
                                "RESUME_CHANGED=1 to continue from it anyway")
        if self.runtime.is_main:
            log.warning("RESUME_CHANGED=1: %s; continuing from it anyway", message)

    # -- the loop

    def fit(self, tracker: Tracker | None = None) -> Result:
        from tqdm.auto import tqdm

        self.tracker = tracker or no_tracker()
        t = self.config.train
        start, window = time.perf_counter(), _Window(self.runtime.device, self.peak_tflops)
        bar = tqdm(total=self.plan.total_steps, initial=self.step, desc=self.config.name, unit="step",
                   disable=not self.runtime.is_main, dynamic_ncols=True)
        self.engine.train()
        try:  # the bar ends its line however the loop ends, so a stop message starts on a line of its own
            while self.step < self.plan.total_steps:
                loss, counts = self._optimizer_step(t.max_grad_norm)
                self.step += 1
                flops = self.sizes.flops(counts.tokens, counts.squared_lengths)
                window.add(loss, counts, flops)
                self.run_counts, self.run_flops = self.run_counts + counts, self.run_flops + flops
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == self.plan.total_steps:
                    self._log(window.close())  # every rank: the window's loss and tokens are summed over ranks
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{self.last_tps:.0f}")
                if self.held_out and (self.step % self.eval_every == 0 or self.step == self.plan.total_steps):
                    # before the save (a resume cuts the log back to the checkpoint's step); its seconds are not
                    # training time, so tokens/s leaves them out
                    window.since += self._log_eval()
                if self.step % self.config.checkpoints.save_steps == 0 or self.step == self.plan.total_steps:
                    self.save()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        counts = self.run_counts
        return Result(self.step, self.last_loss, counts.tokens * self.layout.world_size / seconds if counts.tokens
                      else None, peak_mem_gib(self.runtime.device), seconds, self.resumed_from,
                      mfu=self.run_flops / seconds / 1e12 / self.peak_tflops if self.peak_tflops else None,
                      padding=1 - counts.tokens / counts.slots if counts.slots else None,
                      eval_loss=self.last_eval[1] if self.last_eval else None,
                      eval_step=self.last_eval[0] if self.last_eval else None)

    def _optimizer_step(self, max_grad_norm: float) -> tuple[torch.Tensor, BatchCounts]:
        """grad_accum micro-batches through cogumi.train.step.accumulate, clip, step; returns (loss, counts).

        The micro-batches are taken (on the host) before the first forward: each is weighted by its share of the
        step's trained tokens, so the loss is the token mean of the whole effective batch, packed or not.
        """
        device = self.runtime.device
        taken, step_trained = self.batches.next_step()
        weights = token_weights([counts.trained for _, counts in taken], step_trained, self.layout.world_size)
        micro_batches = (batch_to_device(batch, device) for batch, _ in taken)
        # no .item() anywhere here: the GPU never waits for the host (packed rows' segment bounds come from the host)
        loss = accumulate(self.engine, micro_batches, weights, self.no_sync)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, sum((counts for _, counts in taken), BatchCounts())

    def _log(self, window: dict) -> None:
        self.last_loss, self.last_tps = window["loss"], window["tokens_per_s"]
        if not self.runtime.is_main:
            return
        # tokens_per_s counts real (non-pad) tokens; mfu uses cogumi.train.flops, as the bench does
        row = {"step": self.step, "loss": round(window["loss"], 6), "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": round(window["tokens_per_s"], 1), "mfu": window["mfu"],
               "padding": window["padding"], "peak_mem_gib": round(peak_mem_gib(self.runtime.device), 3)}
        append_row(self.log_path, row)
        self.tracker.log(row)  # tensorboard / wandb, when train.report_to asks for them
        log.debug("step %d: %s", self.step, row)


    # -- held-out loss

    def _log_eval(self) -> float:
        """Evaluate, log the row on rank 0; returns the seconds it took."""
        row = eval_row(self.step, self.model, self.engine, self.held_out, self.batches.collate,
                       self.layout.micro_batch_size, self.runtime)
        self.last_eval = (self.step, row["eval_loss"])
        if self.runtime.is_main:
            append_row(self.log_path, row)
            self.tracker.log(row)
            log.info("step %d: eval_loss %.4f over the %d answer tokens of the held-out set", self.step,
                     row["eval_loss"], row["eval_tokens"])
        return row["eval_s"]


def wrap_for_distributed(model, runtime: Runtime):
    """(the module the loop calls, its no_sync context): DDP with several processes, the model itself with one."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # Refused rather than ignored: DDP here would put the whole base on every GPU, the opposite of what FSDP
        # was asked for (and an out-of-memory error for a base that needs FSDP).
        raise UserError("launched with an FSDP accelerate config, but this trainer wraps the model in DDP only",
                        where="ACCELERATE_USE_FSDP=true (an accelerate launch with an FSDP config)",
                        fix="use `make train GPUS=N` (DDP) for a base that fits one GPU; docs/MULTI_GPU.md "
                            "('FSDP recipe') lists what FSDP still needs")
    if runtime.world_size <= 1:
        return model, nullcontext
    from torch.nn.parallel import DistributedDataParallel

    # Every LoRA parameter takes part in every step, so find_unused_parameters stays off (it would walk the graph
    # each step). Gradients are views into DDP's buckets: no second copy of the LoRA gradients.
    ddp = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                  find_unused_parameters=False, gradient_as_bucket_view=True)
    return ddp, ddp.no_sync


class _Window:
    """Loss and throughput since the last log line; the one host sync per log interval happens in close()."""

    def __init__(self, device: torch.device, peak_tflops: float | None):
        self.device, self.peak_tflops = device, peak_tflops
        self._reset()

    def _reset(self):
        self.losses, self.tokens, self.slots, self.flops, self.since = [], 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, counts: BatchCounts, flops: float) -> None:
        self.losses.append(loss)
        self.tokens += counts.tokens
        self.slots += counts.slots
        self.flops += flops

    def close(self) -> dict:
        """Mean loss over the window and all ranks; real tokens/s of all ranks together, padding, MFU per GPU."""
        loss = torch.stack(self.losses).float().mean().item()
        loss_sum, tokens, ranks, slots, flops = distributed.sum_values(
            [loss, float(self.tokens), 1.0, float(self.slots), self.flops], self.device)
        seconds = max(time.perf_counter() - self.since, 1e-9)
        mfu = flops / ranks / seconds / 1e12 / self.peak_tflops if self.peak_tflops else None
        out = {"loss": loss_sum / ranks, "tokens_per_s": tokens / seconds,
               "padding": round(1 - tokens / slots, 4) if slots else None,
               "mfu": None if mfu is None else round(mfu, 4)}
        self._reset()
        return out
