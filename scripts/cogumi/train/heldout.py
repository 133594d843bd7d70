"""The held-out loss (eval_loss): the training loss, without gradients, on examples the run never trains on.

nanoGPT's estimate_loss and axolotl's eval_steps log it every N steps; without it an overfit phase shows only after
its merge and validation (an hour and more later). The held-out items come from cogumi.train.data.encode_data
(data.eval_path, or data.eval_fraction of the training examples, split before packing).
"""

from __future__ import annotations

import time

import torch

from cogumi.train import distributed
from cogumi.train.data import Collator
from cogumi.train.packed_attention import batch_to_device


@torch.no_grad()
def held_out_loss(model, engine, items: list, collate: Collator, micro_batch_size: int, runtime) -> tuple[float, int]:
    """(token-mean loss, trained tokens) over `items`: no gradients, dropout off, the training's label masks.

    Micro-batch k of the items goes to rank k % world_size; one sum_values adds the ranks' loss sums and token
    counts, so the number does not depend on the process count. It draws no random numbers, so the training's RNG
    streams (and with them an exact resume) never see it. `engine` (the DDP wrapper, or the model) is switched to
    eval mode and back; the forward goes through `model` itself, outside DDP's gradient hooks.
    """
    device = runtime.device
    chunks = [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    engine.eval()
    try:
        for chunk in chunks[runtime.rank::runtime.world_size]:
            trained = Collator.counts(chunk).trained
            if trained:
                # the model's loss is the mean over this micro-batch's trained tokens: weighted back to a sum.
                # No KV cache (packed attention refuses one; it only costs memory here).
                loss = model(**batch_to_device(collate(chunk), device), use_cache=False).loss
                loss_sum += loss.double() * trained
                tokens += trained
    finally:
        engine.train()
    total, n = distributed.sum_values([loss_sum.item(), float(tokens)], device)
    return total / max(n, 1.0), int(n)


def eval_row(step: int, model, engine, items: list, collate: Collator, micro_batch_size: int, runtime) -> dict:
    """The train_log.jsonl row of one evaluation (every rank computes it; rank 0 writes it)."""
    started = time.perf_counter()
    loss, tokens = held_out_loss(model, engine, items, collate, micro_batch_size, runtime)
    return {"step": step, "eval_loss": round(loss, 6), "eval_tokens": tokens,
            "eval_s": round(time.perf_counter() - started, 3)}


def eval_share(total_steps: int, tokens_per_step: int, eval_every: int, held_out_tokens: int) -> float:
    """The share of the run's compute its evaluations cost: a forward is about a third of forward + backward."""
    evals = total_steps // eval_every + (total_steps % eval_every != 0)
    train_tokens = max(1, total_steps * tokens_per_step)
    return evals * held_out_tokens / 3 / train_tokens
