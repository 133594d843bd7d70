"""One benchmark variant in its own process: the trainer's step on random weights, timed.

Two modes. Full rows (`lengths: "full"`): every micro-batch is `micro_batch` rows of `seq` random tokens, the
headline figure of earlier runs. Real lengths (`lengths: "mix"`): examples with the lengths of real conversations
(cogumi.perf.lengths), either padded per micro-batch (unpacked) or packed whole into rows of `seq` tokens with
per-example attention (cogumi.train.packed_attention), exactly as the trainer batches them (cogumi.train.data).
Throughput counts real (non-pad) tokens; MFU uses cogumi.train.flops, the trainer's count.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import ExitStack
from pathlib import Path

from cogumi.perf.models import (
    GIB,
    add_lora,
    build_model,
    device_info,
    lora_grad_summary,
    restore_dropout,
    set_dropout,
    versions,
)


def _real_length_data(spec: dict, vocab_size: int):
    """(timed items, collator, check batch, mix stats) for the real-length mode."""
    from cogumi.perf.lengths import describe, load_mix, mix_examples
    from cogumi.train.data import Collator, pack

    mix = load_mix()
    seq, packed = int(spec["seq"]), bool(spec["packed"])
    examples = mix_examples(mix, vocab_size, seq, int(spec["real_examples"]), seed=int(spec.get("mix_seed", 0)))
    collate = Collator(pad_id=0, packed=packed)
    items = pack(examples, seq) if packed else examples
    # The loss check: the same first examples in every variant, as packed rows or one padded row each. Several
    # packed rows, each with its own example boundaries and positions: a kernel that is wrong per row (ISSUES_LOG
    # B38) moves this loss and gradient away from the plain path's; one row could not show it.
    rows = pack(examples[:14], seq)[:3]
    first = [ex for row in rows for ex in row]
    check = collate(rows) if packed else collate(first)
    return items, collate, check, {**describe(mix["lengths"]), "timed_examples": len(examples)}


def _full_row_data(spec: dict, vocab_size: int, max_bs: int, packed: bool):
    """make_batch(bs): bs rows of seq random tokens; as packed rows of one example each when `packed` (the phase
    defaults pack, so their attention is the packed kernel on full rows too)."""
    import torch

    from cogumi.train.data import BatchCounts

    seq = int(spec["seq"])
    gen = torch.Generator(device="cpu").manual_seed(1234)
    ids_all = torch.randint(0, vocab_size, (max_bs, seq), generator=gen)

    def make_batch(bs: int) -> tuple[dict, BatchCounts]:
        ids = ids_all[:bs]
        batch = {"input_ids": ids, "labels": ids}
        if packed:
            batch["position_ids"] = torch.arange(seq).expand(bs, seq)
        return batch, BatchCounts(bs * seq, bs * seq, bs * (seq - 1), bs * seq * seq)

    return make_batch


def run_variant(spec: dict) -> dict:
    import torch

    from cogumi.train.data import BatchCounts, Collator
    from cogumi.train.fastpath import fast_path
    from cogumi.train.flops import matmul_sizes, peak_tflops
    from cogumi.train.layout import probe_batch
    from cogumi.train.packed_attention import batch_to_device, choose_kernel, packed_attention
    from cogumi.train.probe import probe_layout, set_checkpointing
    from cogumi.train.step import train_step

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    real = spec.get("lengths") == "mix"
    packed = bool(spec.get("packed"))
    cuda = device.type == "cuda"
    with ExitStack() as stack:
        applied = {}
        if spec["fast"]:
            applied = stack.enter_context(fast_path(spec["liger"], device.type, fused_lora=spec["fused_lora"],
                                                    chunked_loss=spec["chunked_loss"], liger_loss=spec["liger_loss"]))
        t0 = time.perf_counter()
        model = add_lora(build_model(spec["shape"], device, dtype), spec["r"], spec["alpha"], spec["dropout"],
                         spec["target_modules"])
        model.train()
        build_s = time.perf_counter() - t0
        kernel = stack.enter_context(packed_attention(model, choose_kernel(device, dtype))) if packed else None
        vocab = model.config.vocab_size
        max_bs = spec["micro_batch"] if isinstance(spec["micro_batch"], int) else int(spec.get("max_micro_batch", 4))
        if real:
            items, collate, check_batch, mix_stats = _real_length_data(spec, vocab)
            make_probe = probe_batch(collate, items, vocab, device)
        else:
            make_full = _full_row_data(spec, vocab, max_bs, packed)
            check_batch, mix_stats = make_full(1)[0], None

            def make_probe(bs):
                return batch_to_device(make_full(bs)[0], device)

        layout = None
        if spec["ckpt"] == "auto":
            layout = probe_layout(model, make_probe, train_step, int(spec["budget_bytes"]), range(max_bs, 0, -1)) \
                if cuda else {"micro_batch": max_bs, "checkpoint_layers": 0, "tried": []}
            micro_batch, ckpt_layers = layout["micro_batch"], layout["checkpoint_layers"]
            set_checkpointing(model, ckpt_layers)
        else:
            micro_batch = int(spec["micro_batch"])
            ckpt_layers = model.config.num_hidden_layers if spec["ckpt"] == "all" else int(spec["ckpt"])
            if spec["fast"]:
                set_checkpointing(model, ckpt_layers)
            elif ckpt_layers:  # the plain path exactly as users write it
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # Loss/gradient check on one shared batch, dropout off so every variant computes one function.
        saved = set_dropout(model, 0.0)
        model.zero_grad(set_to_none=True)
        check = {"loss": float(train_step(model, batch_to_device(check_batch, device), 1.0)),
                 **lora_grad_summary(model)}
        restore_dropout(model, saved)
        model.zero_grad(set_to_none=True)

        if real:
            batches = [(collate(items[i:i + micro_batch]), Collator.counts(items[i:i + micro_batch]))
                       for i in range(0, len(items), micro_batch)]
            # Warm up on the first micro-batches, then time all of them: every variant times the same examples.
            warm, timed = batches[:spec["warmup"]], batches
        else:
            warm, timed = [make_full(micro_batch)] * spec["warmup"], [make_full(micro_batch)] * spec["steps"]
        timed = [(batch_to_device(b, device), c) for b, c in timed]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for batch, _ in warm:
            train_step(model, batch_to_device(batch, device), 1.0)
            model.zero_grad(set_to_none=True)
        step_s, total_s, losses = _timed_steps(model, [b for b, _ in timed], cuda, train_step)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        attention = f"packed rows: {kernel}" if kernel else model.config._attn_implementation
        profile = _profile(model, timed[0][0], spec) if spec.get("profile") and cuda else None
    counts = sum((c for _, c in timed), BatchCounts())
    sizes = matmul_sizes(model)
    tok_s = counts.tokens / total_s
    info = device_info(device)
    peak_tf = peak_tflops(info["gpu"])
    useful = sizes.flops(counts.tokens, counts.squared_lengths) / total_s / 1e12
    return {
        "variant": spec["name"], "note": spec.get("note", ""), "shape": spec["shape"], "seq": int(spec["seq"]),
        "lengths": "real mix" if real else "full rows", "packed": packed, "mix": mix_stats,
        "micro_batch": micro_batch, "checkpoint_layers": ckpt_layers, "dropout": spec["dropout"], "applied": applied,
        "layout_probe": layout, "tokens_per_s": round(tok_s, 1), "real_tokens": counts.tokens,
        "padding": round(1 - counts.tokens / counts.slots, 4), "micro_batches_timed": len(step_s),
        "step_s_median": round(sorted(step_s)[len(step_s) // 2], 4), "step_s_min": round(min(step_s), 4),
        "useful_tflops": round(useful, 1), "useful_gflop_per_token": round(useful * 1e3 / tok_s, 3),
        "mfu": round(useful / peak_tf, 4) if peak_tf else None, "peak_tflops_datasheet": peak_tf,
        "peak_gib": None if peak is None else round(peak / GIB, 2),
        "reserved_gib": None if reserved is None else round(reserved / GIB, 2),
        "check": check, "loss_timed": float(losses[-1]), "build_s": round(build_s, 1), "dtype": spec["dtype"],
        "attention": attention, "profile": profile, **info, "versions": versions(),
        "date": dt.date.today().isoformat(),
    }


def _timed_steps(model, batches: list[dict], cuda: bool, step) -> tuple[list[float], float, list]:
    """(seconds of each step, seconds of all of them end to end, losses): throughput uses the end-to-end time, so
    host work between steps (and the packed attention's one host read per forward) is counted."""
    import torch

    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    for batch in batches:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(model, batch, 1.0)
            end.record()
            times.append((start, end))
        else:
            t = time.perf_counter()
            loss = step(model, batch, 1.0)
            times.append(time.perf_counter() - t)
        losses.append(loss)
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1000 for s, e in times]
    return times, time.perf_counter() - began, losses


def _profile(model, batch, spec) -> str | None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cogumi.train.step import train_step

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, batch, 1.0)
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    path = Path(spec["out_dir"]) / f"profile-{spec['name']}.txt"
    path.write_text(table, encoding="utf-8")
    return str(path)
