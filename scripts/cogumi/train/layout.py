"""How one optimizer step is split: micro-batch x accumulation x processes, and which layers are checkpointed.

The effective batch (examples per optimizer step) is `train.micro_batch_size x train.grad_accum` as written in the
config, whatever the number of processes: with N processes each accumulates E / (micro x N) micro-batches. So a
run, and a resumed run, trains the same thing on 1 or N GPUs (docs/MULTI_GPU.md). With
`train.checkpoint_layers: auto` on a GPU, rank 0's memory probe (cogumi.train.probe.probe_layout) picks the
micro-batch (a divisor of E / N, at most train.micro_batch_size) and the fewest checkpointed layers that fit
`train.memory_budget_gib`; accumulation is recomputed from it, so the effective batch does not change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cogumi.core.config import PhaseConfig
from cogumi.core.errors import UserError
from cogumi.train import distributed
from cogumi.train.data import Example
from cogumi.train.packed_attention import batch_to_device, require_packed_attention
from cogumi.train.probe import num_layers, probe_layout, set_checkpointing
from cogumi.train.step import train_step

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"  # in each checkpoint: read before the model is wrapped, without the optimizer state
BUDGET_OF_CARD = 0.90  # auto without memory_budget_gib: leave room for the allocator's fragmentation and NCCL


@dataclass(frozen=True)
class Layout:
    micro_batch_size: int
    grad_accum: int
    world_size: int
    checkpoint_layers: int
    n_layers: int
    chosen_by: str  # "config" or "memory probe (...)"

    @property
    def effective_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"batch: micro-batch {self.micro_batch_size} x accumulation {self.grad_accum} x processes "
                f"{self.world_size} = effective batch {self.effective_batch}; activation checkpointing on "
                f"{self.checkpoint_layers} of {self.n_layers} layers ({self.chosen_by})")


def split_effective_batch(effective: int, micro: int, world: int) -> int:
    """Accumulation steps so micro x accumulation x world = effective; a UserError naming the numbers if not."""
    if effective % world:
        raise UserError(f"the effective batch {effective} (train.micro_batch_size x train.grad_accum) cannot be "
                        f"split evenly over {world} processes", where="GPUS / train.grad_accum",
                        fix=f"use a GPU count that divides {effective}, or change train.grad_accum so that "
                            f"micro_batch_size x grad_accum is a multiple of {world}")
    per_process = effective // world
    if per_process % micro:
        raise UserError(f"each of {world} processes takes {per_process} examples per step (effective batch "
                        f"{effective} / {world}), not a multiple of the micro-batch {micro}",
                        where="train.micro_batch_size / GPUS",
                        fix=f"use a train.micro_batch_size that divides {per_process}, or another GPU count")
    return per_process // micro


def read_saved_layout(checkpoint: Path | None) -> dict | None:
    path = None if checkpoint is None else Path(checkpoint) / LAYOUT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None


def write_layout(folder: Path, layout: Layout) -> None:
    (Path(folder) / LAYOUT_FILE).write_text(json.dumps(asdict(layout)) + "\n", encoding="utf-8")


def choose_layout(config: PhaseConfig, model, runtime, effective_batch: int, encoded,
                  saved: dict | None = None) -> Layout:
    """The micro-batch, accumulation and checkpointed layers for this run; the model is left set to them."""
    t = config.train
    world = runtime.world_size
    n_layers = num_layers(model)
    split_effective_batch(effective_batch, 1, world)  # the process count must divide the effective batch
    micro, chosen_by = t.micro_batch_size, "config"
    if not t.gradient_checkpointing:
        layers = 0
    elif t.checkpoint_layers == "all":
        layers = n_layers
    elif t.checkpoint_layers != "auto":
        layers = min(int(t.checkpoint_layers), n_layers)
    elif runtime.device.type != "cuda":
        layers, chosen_by = n_layers, "auto without a GPU: every layer, memory is not probed"
    else:
        micro, layers, chosen_by = _probe(config, model, runtime, effective_batch // world, encoded, saved)
    accum = split_effective_batch(effective_batch, micro, world)
    set_checkpointing(model, layers)
    return Layout(micro, accum, world, layers, n_layers, chosen_by)


def _probe(config: PhaseConfig, model, runtime, per_process: int, encoded, saved: dict | None):
    t = config.train
    candidates = [m for m in range(min(t.micro_batch_size, per_process), 0, -1) if per_process % m == 0]
    if saved and saved.get("micro_batch_size") in candidates:
        # A resumed run keeps its micro-batch: the saved data position counts micro-batches, and the same split
        # keeps the resumed steps bit-for-bit those of the interrupted run.
        candidates = [saved["micro_batch_size"]]
    card = torch.cuda.get_device_properties(runtime.device).total_memory
    budget = int(t.memory_budget_gib * 2**30) if t.memory_budget_gib else int(BUDGET_OF_CARD * card)
    if encoded.collate.packed:
        require_packed_attention(model)  # the probe must measure the attention the run will use
    batch_of = probe_batch(encoded.collate, encoded.items, model.config.vocab_size, runtime.device)

    def probe():
        try:
            return probe_layout(model, batch_of, train_step, budget, candidates)
        except RuntimeError as err:
            raise UserError(f"no micro-batch in {candidates} fits {budget / 2**30:.1f} GiB with rows of up to "
                            f"{config.data.max_seq_len} tokens even with every layer checkpointed ({err})",
                            where="train.memory_budget_gib / data.max_seq_len",
                            fix="raise train.memory_budget_gib, lower data.max_seq_len, or use a larger GPU") from err

    # Rank 0 probes (the GPUs are alike) and every rank takes its answer: they must split batches the same way.
    found = distributed.on_main(probe)
    log.info("memory probe (budget %.1f GiB): %s", budget / 2**30, found["tried"])
    return found["micro_batch"], found["checkpoint_layers"], f"memory probe within {budget / 2**30:.1f} GiB"


def probe_shape(items: list, packed: bool) -> list[int]:
    """The example lengths of the row the probe measures: the run's largest row.

    Packed: the packed row with the most tokens (rows are nearly full; its examples keep their own lengths, so the
    attention kernel sees the run's segments). Unpacked: the longest example (a micro-batch pads to it).
    """
    if packed:
        return [len(ex.input_ids) for ex in max(items, key=lambda row: sum(len(ex.input_ids) for ex in row))]
    return [max(len(ex.input_ids) for ex in items)]


def probe_batch(collate, items: list, vocab_size: int, device: torch.device):
    """make_batch(bs) for the probe: bs rows as large as the run's largest (probe_shape), every token trained.

    Packed, row r holds the same examples in another order (rotated by r): the same tokens and memory, but each row
    has its own example boundaries and positions, as the run's rows do, so a kernel that is wrong per row changes
    what the probe measures (ISSUES_LOG B38).
    """
    lengths = probe_shape(items, collate.packed)
    row = [Example(ids, list(ids)) for ids in
           ([(7 * (i + j) + 3) % vocab_size for j in range(n)] for i, n in enumerate(lengths))]

    def make(bs: int) -> dict:
        if not collate.packed:
            return batch_to_device(collate([row[0]] * bs), device)
        return batch_to_device(collate([row[r % len(row):] + row[:r % len(row)] for r in range(bs)]), device)

    return make
