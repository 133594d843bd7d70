"""One rank of `bench_train.py --ddp`: the trainer's optimizer step under DDP, timed per step."""

from __future__ import annotations

import datetime as dt
import os
import time

from cogumi.perf.models import GIB, add_lora, build_model, device_info, versions


def run_ddp_worker(spec: dict) -> dict | None:
    """One rank of `--ddp`: the trainer's optimizer step (cogumi.train.step.accumulate, DDP through
    cogumi.train.trainer.wrap_for_distributed, clip, fused AdamW) on the phase's shape with the fast path;
    rank 0 returns the timings, the others None."""
    import torch
    import torch.distributed as dist

    from cogumi.train.fastpath import fast_path

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    with fast_path("auto", device.type) as applied:
        return _rank_steps(spec, applied, device, dtype, rank, world)


def _rank_steps(spec: dict, applied: dict, device, dtype, rank: int, world: int) -> dict | None:
    import torch
    import torch.distributed as dist

    from cogumi.train.model import Runtime
    from cogumi.train.probe import set_checkpointing
    from cogumi.train.step import accumulate
    from cogumi.train.trainer import wrap_for_distributed

    cuda = device.type == "cuda"
    model = add_lora(build_model(spec["shape"], device, dtype), spec["r"], spec["alpha"], 0.0, spec["target_modules"])
    layers = set_checkpointing(model, int(spec["ckpt"]))
    model.train()
    runtime = Runtime(device=device, dtype=dtype, attention="sdpa", rank=rank, world_size=world)
    engine, no_sync = wrap_for_distributed(model, runtime)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    micro, accum, seq = int(spec["micro_batch"]), int(spec["accum"]), int(spec["seq"])
    gen = torch.Generator().manual_seed(1234 + rank)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def optimizer_step():
        loss = accumulate(engine, (batch for _ in range(accum)), [1.0 / accum] * accum, no_sync)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(spec["warmup"]):
        optimizer_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if world > 1:
        dist.barrier()
    step_s = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        loss = optimizer_step()
        if cuda:
            torch.cuda.synchronize()  # per step: the all-reduce is inside the step, its wait must be counted
        step_s.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    median = sorted(step_s)[len(step_s) // 2]
    out = {"variant": f"ddp-{world}", "world_size": world, "micro_batch": micro, "accum": accum, "seq": seq,
           "checkpoint_layers": len(layers), "tokens_per_step_per_gpu": micro * accum * seq,
           "step_s_median": round(median, 4), "step_s": [round(x, 4) for x in step_s],
           "tokens_per_s_per_gpu": round(micro * accum * seq / median, 1),
           "tokens_per_s_total": round(world * micro * accum * seq / median, 1),
           "peak_gib": None if peak is None else round(peak, 2), "loss": float(loss), "applied": applied,
           **device_info(device), "versions": versions(), "date": dt.date.today().isoformat()}
    if world > 1:
        dist.barrier()  # leave together (a rank that exits first can hang its peer's teardown)
        dist.destroy_process_group()
    return out if rank == 0 else None
