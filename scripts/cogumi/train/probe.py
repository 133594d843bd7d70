"""Activation checkpointing per layer and the memory probe that picks the micro-batch and checkpointed layers.

`set_checkpointing(model, n)` checkpoints n decoder layers spread evenly; `probe_layout` measures peak memory of
real steps on the GPU and keeps the fastest layout within a budget. The probe's rows are shaped like the run's
(cogumi.train.layout.probe_batch): full packed rows, or the longest example when unpacked.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable


def decoder_of(model):
    """The module that holds `.layers` and `.gradient_checkpointing` (LlamaModel under peft/CausalLM wrappers)."""
    seen = model
    for _ in range(6):
        if hasattr(seen, "layers") and hasattr(seen, "gradient_checkpointing"):
            return seen
        for attr in ("base_model", "model"):
            nxt = getattr(seen, attr, None)
            if nxt is not None and nxt is not seen:
                seen = nxt
                break
        else:
            break
    raise TypeError(f"no decoder with .layers found in {type(model).__name__}")


def set_checkpointing(model, layers: int) -> list[int]:
    """Activation checkpointing on `layers` decoder layers spread evenly (0: none, all: every layer).

    Non-reentrant torch checkpointing, so inputs need no requires_grad and custom autograd functions recompute.
    Returns the indices of the checkpointed layers. Each checkpointed layer keeps only its input for backward and
    runs its forward twice, so the recompute costs about 1/3 of that layer's step time.
    """
    from torch.utils.checkpoint import checkpoint

    decoder = decoder_of(model)
    n_layers = len(decoder.layers)
    layers = max(0, min(int(layers), n_layers))
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    if layers == 0:
        decoder.gradient_checkpointing = False
        return []
    chosen = sorted({int((i + 0.5) * n_layers / layers) for i in range(layers)})
    ids = {id(decoder.layers[i]) for i in chosen}

    def checkpoint_some(fn, *args, **kwargs):
        if id(getattr(fn, "__self__", None)) in ids:
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    decoder.gradient_checkpointing = True
    decoder._gradient_checkpointing_func = checkpoint_some
    return chosen


def num_layers(model) -> int:
    return len(decoder_of(model).layers)


def _one_step(model, batch, step) -> int | None:
    """Peak allocated bytes of one step from a clean state; None on out-of-memory."""
    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step(model, batch, 1.0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        peak = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def probe_layout(model, make_batch: Callable[[int], dict], step: Callable, budget_bytes: int,
                 micro_batches: Iterable[int] = (4, 3, 2, 1), time_steps: int = 2, margin: float = 0.02) -> dict:
    """Pick the micro-batch and the number of checkpointed layers that train fastest within `budget_bytes`.

    For each micro-batch: one step with every layer checkpointed and one with half gives the memory each
    un-checkpointed layer adds; the fewest checkpointed layers that fit the budget (less `margin`) is then run to
    confirm its peak, and timed over `time_steps` steps. The fastest confirmed layout wins; the model is left set
    to it with gradients cleared. A CUDA device is required (memory is read from the caching allocator).
    """
    import torch

    n = num_layers(model)
    limit = budget_bytes * (1 - margin)
    tried = []
    best = None
    for bs in micro_batches:
        batch = make_batch(bs)
        set_checkpointing(model, n)
        peak_all = _one_step(model, batch, step)
        row = {"micro_batch": bs, "peak_all_gib": None if peak_all is None else round(peak_all / 2**30, 2)}
        tried.append(row)
        if peak_all is None or peak_all > limit:
            row["fits"] = False
            continue
        set_checkpointing(model, n // 2)
        peak_half = _one_step(model, batch, step)
        if peak_half is None:
            layers = n
        else:
            per_layer = max(1, peak_half - peak_all) / max(1, n - n // 2)
            layers = n - int((limit - peak_all) // per_layer)
            layers = max(0, min(n, layers))
        while True:
            set_checkpointing(model, layers)
            peak = _one_step(model, batch, step)
            if (peak is not None and peak <= limit) or layers >= n:
                break
            layers = min(n, layers + max(1, n // 16))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(time_steps):
            step(model, batch, 1.0)
            model.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        tok_s = time_steps * sum(int(v.numel()) for k, v in batch.items() if k == "input_ids") / seconds
        row.update({"checkpoint_layers": layers, "peak_gib": None if peak is None else round(peak / 2**30, 2),
                    "tokens_per_s": round(tok_s, 1), "fits": True})
        if best is None or tok_s > best["tokens_per_s"]:
            best = row
    if best is None:
        raise RuntimeError(f"no layout fits {budget_bytes / 2**30:.1f} GiB: {tried}")
    set_checkpointing(model, best["checkpoint_layers"])
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return {"micro_batch": best["micro_batch"], "checkpoint_layers": best["checkpoint_layers"], "tried": tried}
