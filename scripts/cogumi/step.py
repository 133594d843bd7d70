"""The one training step, shared by the trainer and scripts/bench_train.py so the benchmark times exactly it."""

from __future__ import annotations


def train_step(model, batch: dict, loss_scale: float):
    """Forward + backward of one micro-batch; returns the unscaled loss (a detached tensor).

    `loss_scale` is 1 / gradient-accumulation steps so accumulated gradients equal one big batch's.
    """
    loss = model(**batch).loss
    (loss * loss_scale).backward()
    return loss.detach()
