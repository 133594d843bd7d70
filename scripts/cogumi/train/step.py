"""The training step, shared by the trainer and scripts/bench/bench_train.py so the benchmark times exactly it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext


def train_step(model, batch: dict, loss_scale: float):
    """Forward + backward of one micro-batch; returns the unscaled loss (a detached tensor).

    The model's loss is the mean over the micro-batch's trained tokens; `loss_scale` is that micro-batch's share of
    the optimizer step's trained tokens (see token_weights), so accumulated gradients are those of one big batch.
    """
    loss = model(**batch).loss
    (loss * loss_scale).backward()
    return loss.detach()


def token_weights(trained_tokens: Sequence[int], step_total: int | None = None, world_size: int = 1) -> list[float]:
    """Each micro-batch's share of the optimizer step's trained tokens, so the step's loss is the mean over all of
    them however the examples are split into micro-batches, packed into rows or spread over processes (not a mean of
    micro-batch means). `step_total`: the trained tokens of the whole step on every process (default: these
    micro-batches'); DDP averages gradients over processes, hence the factor world_size."""
    total = sum(trained_tokens) if step_total is None else step_total
    if total <= 0:
        return [1.0 / len(trained_tokens)] * len(trained_tokens)
    return [world_size * n / total for n in trained_tokens]


def accumulate(model, micro_batches: Iterable[dict], weights: Sequence[float], no_sync: Callable = nullcontext):
    """The micro-batches through train_step, each scaled by its weight; returns the weighted loss (a detached
    tensor, no host sync).

    Under DistributedDataParallel pass `no_sync=ddp.no_sync`: the gradient all-reduce then runs once, during the
    last micro-batch's backward, instead of after every micro-batch.
    """
    total = None
    last = len(weights) - 1
    for i, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
        with no_sync() if i < last else nullcontext():
            loss = train_step(model, batch, weight) * weight
        total = loss if total is None else total + loss
    return total
