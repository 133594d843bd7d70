"""The training step, shared by the trainer and scripts/bench/bench_train.py so the benchmark times exactly it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext


def train_step(model, batch: dict, loss_scale: float):
    """Forward + backward of one micro-batch; returns the unscaled loss (a detached tensor).

    `loss_scale` is 1 / gradient-accumulation steps so accumulated gradients equal one big batch's.
    """
    loss = model(**batch).loss
    (loss * loss_scale).backward()
    return loss.detach()


def accumulate(model, micro_batches: Iterable[dict], grad_accum: int, no_sync: Callable = nullcontext):
    """`grad_accum` micro-batches through train_step; returns their mean loss (a detached tensor, no host sync).

    Under DistributedDataParallel pass `no_sync=ddp.no_sync`: the gradient all-reduce then runs once, during the
    last micro-batch's backward, instead of after every micro-batch.
    """
    total = None
    for i, batch in enumerate(micro_batches):
        with no_sync() if i < grad_accum - 1 else nullcontext():
            loss = train_step(model, batch, 1.0 / grad_accum)
        total = loss if total is None else total + loss
    return total / grad_accum
