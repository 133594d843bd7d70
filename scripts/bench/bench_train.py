"""Training-step benchmark: the fast path against plain transformers+peft, side by side, in one call.

    make bench-train PHASE=1a                       # GPU: 8B shape, seq = the phase's max_seq_len
    python scripts/bench/bench_train.py --shape tiny      # CPU: tiny Llama, seconds (what `make test` runs)
    python scripts/bench/bench_train.py --variants explore --out-dir DIR   # every variant of docs/PERFORMANCE.md
    python scripts/bench/bench_train.py --ddp --gpus 2 --out-dir DIR  # 1 vs 2 GPUs with DDP (bench_ddp.sh)

Builds the phase's architecture with random weights directly on the device (no download; speed and memory do not
depend on the weights), adds LoRA (the phase's r and alpha, all linear layers), and times exactly
`cogumi.train.step.train_step`, the step the trainer runs. Each variant runs in its own process, so kernel patches and
allocator state never leak between them. Reports tokens/s, MFU, peak memory and the loss and gradient of one
shared micro-batch, which must agree with the plain path's within the dtype's tolerance.

FLOPs counted as useful (recompute from checkpointing is not): 4 N per token for the frozen linears (forward and
input-gradient backward; N = decoder linears + LM head), 6 r (in+out) per LoRA layer, and causal attention
6 s d per layer. MFU is against the card's dense bf16 peak (H100 SXM: 989 TFLOP/s) and, beside it, against the
bf16 matmul rate measured in the same call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Run as a file (make bench-train): the cogumi package lives one folder up.
SCRIPTS = Path(__file__).resolve().parents[1]
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

GIB = 2**30
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, datasheet (SXM)

SHAPES = {
    # Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B-Instruct)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
               rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# Each variant: the plain path (peft defaults: float32 adapters, transformers loss) or the fast path's pieces.
PLAIN = dict(fast=False, liger="off", fused_lora=False, chunked_loss=False, liger_loss=False)
FAST = dict(fast=True, liger="auto", fused_lora=True, chunked_loss=True, liger_loss=False)
VARIANTS = {
    "baseline": dict(PLAIN, dropout=0.05, ckpt="all", micro_batch=4,
                     note="plain transformers+peft: bf16, sdpa, lora_dropout 0.05, checkpointing, bs4"),
    "plain-d0": dict(PLAIN, dropout=0.0, ckpt=0, micro_batch=1, note="plain path, dropout 0, no checkpointing"),
    "liger-only": dict(PLAIN, fast=True, liger="auto", liger_loss=True, dropout=0.0, ckpt="all", micro_batch=4,
                       note="Liger 0.3.1 (incl. its fused linear CE) + dropout 0; peft LoRA"),
    "fast-ckpt-bs4": dict(FAST, dropout=0.0, ckpt="all", micro_batch=4, note="fast path, checkpoint every layer"),
    "fast-bs1": dict(FAST, dropout=0.0, ckpt=0, micro_batch=1, note="fast path, no checkpointing"),
    "fast-bs2": dict(FAST, dropout=0.0, ckpt=0, micro_batch=2, note="fast path, no checkpointing"),
    "fast-ck16-bs2": dict(FAST, dropout=0.0, ckpt=16, micro_batch=2, note="fast path, checkpoint 16 of 32 layers"),
    "fast-ck8-bs2": dict(FAST, dropout=0.0, ckpt=8, micro_batch=2, note="fast path, checkpoint 8 of 32 layers"),
    "fast-ligerloss-bs1": dict(FAST, liger_loss=True, chunked_loss=False, dropout=0.0, ckpt=0, micro_batch=1,
                               note="fast path with Liger's fused linear CE instead of the chunked loss"),
    "fast-peftlora-bs1": dict(FAST, fused_lora=False, dropout=0.0, ckpt=0, micro_batch=1,
                              note="fast path with peft's own LoRA forward (float32 adapter math)"),
    "fast-auto": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline",
                      note="fast path, layout from the memory probe within the baseline's peak"),
    "fast-auto-8192": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="card", seq=8192,
                           max_micro_batch=2, note="fast path at seq 8192, layout from the memory probe (92% of card)"),
    "fast-auto-8192-b": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline", seq=8192,
                             max_micro_batch=1, note="fast path at seq 8192 within the seq-2048 baseline's peak"),
}
SETS = {
    "default": ["baseline", "fast-auto"],
    "cpu": ["baseline", "plain-d0", "fast-bs1", "fast-auto"],
    "check": ["baseline", "fast-auto", "fast-auto-8192-b"],
    "explore": ["baseline", "fast-auto", "fast-auto-8192", "fast-ckpt-bs4", "fast-peftlora-bs1",
                "fast-ligerloss-bs1", "liger-only", "fast-ck16-bs2", "fast-bs2"],
}


# ---------------------------------------------------------------------------------------------------------------
# worker side (one variant per process)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "liger-kernel", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


def _device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"device": "cpu", "gpu": None, "total_gib": None}
    props = torch.cuda.get_device_properties(device)
    return {"device": "cuda", "gpu": props.name, "total_gib": round(props.total_memory / GIB, 1)}


def _peak_tflops(gpu: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu and key in gpu:
            return value
    return None


def build_model(shape: str, device, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def add_lora(model, r: int, alpha: int, dropout: float, target_modules, seed: int = 1):
    import torch
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lcfg)
    # B starts at zero in peft; give it small random values so the adapters take part in the loss check.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            param.data.copy_(values.to(param.device, param.dtype))
    return model


def _lora_grad_summary(model) -> dict:
    """Global norm and a seeded random projection of the LoRA gradients (the same in every process)."""
    import torch

    total_sq = 0.0
    proj = 0.0
    for i, (_name, param) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        if param.grad is None:
            continue
        g = param.grad.detach().float()
        total_sq += float((g * g).sum())
        gen = torch.Generator(device="cpu").manual_seed(1000 + i)
        direction = torch.randn(g.shape, generator=gen).to(g.device)
        proj += float((g * direction).sum())
    return {"grad_norm": total_sq ** 0.5, "grad_proj": proj}


def _set_dropout(model, p: float | None) -> dict:
    """Set every LoRA dropout's p (None restores); returns the previous values."""
    import torch.nn as nn

    saved = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" in name:
            saved[name] = module.p
            if p is not None:
                module.p = p
    return saved


def run_variant(spec: dict) -> dict:
    import torch

    from cogumi.train.fastpath import (
        apply_fast_path,
        lora_matmul_params,
        mark_lora_children,
        probe_layout,
        set_checkpointing,
        useful_flops_per_token,
    )
    from cogumi.train.step import train_step

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    seq = int(spec["seq"])
    applied = {}
    if spec["fast"]:
        applied = apply_fast_path(spec["liger"], device.type, fused_lora=spec["fused_lora"],
                                  chunked_loss=spec["chunked_loss"], liger_loss=spec["liger_loss"])
    t0 = time.perf_counter()
    model = build_model(spec["shape"], device, dtype)
    model = add_lora(model, spec["r"], spec["alpha"], spec["dropout"], spec["target_modules"])
    mark_lora_children(model)
    model.train()
    build_s = time.perf_counter() - t0
    cfg = model.config
    sizes = lora_matmul_params(model)
    flops_tok = useful_flops_per_token(sizes["frozen_matmul_params"], sizes["lora_io_r"], cfg.num_hidden_layers,
                                       cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads), seq)

    max_bs = spec["micro_batch"] if isinstance(spec["micro_batch"], int) else int(spec.get("max_micro_batch", 4))
    gen = torch.Generator(device="cpu").manual_seed(1234)
    ids_all = torch.randint(0, cfg.vocab_size, (max_bs, seq), generator=gen).to(device)

    def make_batch(bs: int) -> dict:
        ids = ids_all[:bs]
        return {"input_ids": ids, "labels": ids}

    cuda = device.type == "cuda"
    layout = None
    if spec["ckpt"] == "auto":
        budget = int(spec["budget_bytes"])
        layout = probe_layout(model, make_batch, train_step, budget, range(max_bs, 0, -1)) if cuda else \
            {"micro_batch": max_bs, "checkpoint_layers": 0, "tried": []}
        micro_batch, ckpt_layers = layout["micro_batch"], layout["checkpoint_layers"]
        set_checkpointing(model, ckpt_layers)
    else:
        micro_batch = int(spec["micro_batch"])
        ckpt_layers = cfg.num_hidden_layers if spec["ckpt"] == "all" else int(spec["ckpt"])
        if spec["fast"]:
            set_checkpointing(model, ckpt_layers)
        elif ckpt_layers:
            # the plain path exactly as users write it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Loss/gradient check on one shared micro-batch (row 0), dropout off so every variant computes one function.
    saved = _set_dropout(model, 0.0)
    model.zero_grad(set_to_none=True)
    check_loss = float(train_step(model, make_batch(1), 1.0))
    check = {"loss": check_loss, **_lora_grad_summary(model)}
    for name, module in model.named_modules():
        if name in saved:
            module.p = saved[name]
    model.zero_grad(set_to_none=True)

    batch = make_batch(micro_batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        train_step(model, batch, 1.0)
        model.zero_grad(set_to_none=True)
    times = []
    losses = []
    for _ in range(spec["steps"]):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = train_step(model, batch, 1.0)
            end.record()
            times.append((start, end))
        else:
            t = time.perf_counter()
            loss = train_step(model, batch, 1.0)
            times.append(time.perf_counter() - t)
        losses.append(loss)
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        step_s = [s.elapsed_time(e) / 1000 for s, e in times]
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        step_s = times
        peak = reserved = None
    tokens = micro_batch * seq
    total_s = sum(step_s)
    tok_s = tokens * len(step_s) / total_s
    info = _device_info(device)
    peak_tf = _peak_tflops(info["gpu"])
    useful = tok_s * flops_tok / 1e12
    result = {
        "variant": spec["name"], "note": spec.get("note", ""), "shape": spec["shape"], "seq": seq,
        "micro_batch": micro_batch, "checkpoint_layers": ckpt_layers, "dropout": spec["dropout"], "applied": applied,
        "layout_probe": layout, "tokens_per_s": round(tok_s, 1),
        "step_s_median": round(sorted(step_s)[len(step_s) // 2], 4), "step_s_min": round(min(step_s), 4),
        "useful_tflops": round(useful, 1), "useful_gflop_per_token": round(flops_tok / 1e9, 3),
        "mfu": round(useful / peak_tf, 4) if peak_tf else None, "peak_tflops_datasheet": peak_tf,
        "peak_gib": None if peak is None else round(peak / GIB, 2),
        "reserved_gib": None if reserved is None else round(reserved / GIB, 2),
        "check": check, "loss_timed": float(losses[-1]), "build_s": round(build_s, 1),
        "dtype": spec["dtype"], "attention": model.config._attn_implementation, **info, "versions": _versions(),
        "date": dt.date.today().isoformat(),
    }
    if spec.get("profile") and cuda:
        result["profile"] = _profile(model, batch, spec)
    return result


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


def run_ceiling(spec: dict) -> dict:
    """Measured bf16 matmul rate (random data, median of timed runs) at 8192^3 and at the model's own shapes."""
    import torch

    device = torch.device(spec["device"])
    if device.type != "cuda":
        return {"variant": "ceiling", "device": "cpu"}
    torch.manual_seed(0)
    shapes = [(8192, 8192, 8192), (2048, 4096, 14336), (2048, 14336, 4096), (2048, 4096, 4096),
              (2048, 4096, 1024), (8192, 4096, 14336), (512, 4096, 128256), (64, 4096, 128256)]
    out = {}
    for m, k, n in shapes:
        sets = [(torch.randn(m, k, device=device, dtype=torch.bfloat16),
                 torch.randn(k, n, device=device, dtype=torch.bfloat16)) for _ in range(3)]
        for a, b in sets:
            a @ b
        torch.cuda.synchronize()
        ts = []
        for i in range(30):
            a, b = sets[i % 3]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            ts.append((s, e))
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in ts)[len(ts) // 2]
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / (ms / 1000) / 1e12, 1)
        del sets
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    copy_tbs = 10 * 2 * x.numel() * 2 / (s.elapsed_time(e) / 1000) / 1e12
    return {"variant": "ceiling", "matmul_tflops": out, "copy_tb_s": round(copy_tbs, 2), **_device_info(device),
            "versions": _versions(), "date": dt.date.today().isoformat()}


def run_ddp_worker(spec: dict) -> dict | None:
    """One rank of `--ddp`: the trainer's optimizer step (cogumi.train.step.accumulate, DDP through
    cogumi.train.trainer.wrap_for_distributed, clip, fused AdamW) on the phase's shape with the fast path;
    rank 0 returns the timings, the others None."""
    import torch
    import torch.distributed as dist

    from cogumi.train.fastpath import apply_fast_path, set_checkpointing
    from cogumi.train.model import Runtime
    from cogumi.train.step import accumulate
    from cogumi.train.trainer import wrap_for_distributed

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    applied = apply_fast_path("auto", device.type)
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
        loss = accumulate(engine, (batch for _ in range(accum)), accum, no_sync)
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
           **_device_info(device), "versions": _versions(), "date": dt.date.today().isoformat()}
    if world > 1:
        dist.barrier()  # leave together (a rank that exits first can hang its peer's teardown)
        dist.destroy_process_group()
    return out if rank == 0 else None


def ddp_bench(args, config, device: str, out_dir: Path) -> int:
    """`--ddp`: the trainer's optimizer step on 1 process and on --gpus processes (torchrun), tokens/s per GPU."""
    shape = args.shape or ("8b" if device == "cuda" else "tiny")
    spec = {"device": device, "dtype": "bfloat16" if device == "cuda" else "float32", "shape": shape,
            "seq": args.seq or (config.data.max_seq_len if shape == "8b" else 64), "r": config.lora.r,
            "alpha": config.lora.alpha, "target_modules": config.lora.target_modules, "micro_batch": args.micro,
            "accum": args.accum, "ckpt": args.ckpt_layers if shape == "8b" else 0,
            "steps": args.steps or (5 if shape == "8b" else 2), "warmup": args.warmup}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    results = []
    for n in (1, args.gpus):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               str(Path(__file__).resolve()), "--worker", "ddp", "--spec", json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][len("RESULT "):]) if lines else \
                {"variant": f"ddp-{n}", "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
        except subprocess.TimeoutExpired:
            row = {"variant": f"ddp-{n}", "error": f"timed out after {args.timeout:.0f} s"}
        results.append(row)
        print(json.dumps({k: row.get(k) for k in ("variant", "tokens_per_s_per_gpu", "tokens_per_s_total",
                                                  "step_s_median", "peak_gib", "error")}), flush=True)
    one, many = results
    summary = {"one_gpu_tokens_per_s": one.get("tokens_per_s_per_gpu"), "gpus": args.gpus,
               "per_gpu_tokens_per_s": many.get("tokens_per_s_per_gpu"),
               "scaling_per_gpu": round(many["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 3)
               if "error" not in one and "error" not in many else None, "spec": spec, "results": results,
               "command": "python scripts/bench/bench_train.py " + " ".join(sys.argv[1:])}
    path = out_dir / f"bench_ddp-{shape}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print("SUMMARY " + json.dumps({k: summary[k] for k in ("one_gpu_tokens_per_s", "per_gpu_tokens_per_s",
                                                            "scaling_per_gpu")} | {"out": str(path)}), flush=True)
    return 0 if summary["scaling_per_gpu"] is not None else 1


def worker_main(kind: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    if kind == "ddp":  # under torchrun: no catch-all, a failed rank must fail the launch
        result = run_ddp_worker(spec)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    try:
        result = run_ceiling(spec) if kind == "ceiling" else run_variant(spec)
    except Exception as err:  # noqa: BLE001 - reported to the parent as a failed variant
        import traceback

        traceback.print_exc()
        oom = "OutOfMemoryError" in type(err).__name__
        result = {"variant": spec.get("name", kind), "error": f"{type(err).__name__}: {str(err)[:300]}", "oom": oom}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parent side


def _spawn(kind: str, spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": spec.get("name", kind), "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"variant": spec.get("name", kind), "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if "error" in result:
        result["stderr_tail"] = proc.stderr[-1500:]
    return result


def _load_phase(phase: str, overrides: list[str]):
    from cogumi.core.config import PhaseConfig, load_config, phase_config_path

    try:
        return load_config(phase_config_path(phase), overrides), phase
    except Exception as err:  # noqa: BLE001 - a missing phase config still lets the bench run on defaults
        print(f"note: phase '{phase}' config not loaded ({err}); using the code defaults", file=sys.stderr)
        return PhaseConfig(), "defaults"


def check_agreement(result: dict, reference: dict, dtype: str) -> dict:
    """Fast vs plain on the same micro-batch: loss and LoRA gradient within the dtype's tolerance."""
    tol_loss, tol_grad = (2e-2, 1e-1) if dtype == "bfloat16" else (1e-4, 1e-3)
    a, b = result["check"], reference["check"]
    loss_rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
    norm_rel = abs(a["grad_norm"] - b["grad_norm"]) / max(abs(b["grad_norm"]), 1e-12)
    proj_rel = abs(a["grad_proj"] - b["grad_proj"]) / max(abs(b["grad_norm"]) * 10, 1e-12)
    return {"loss_rel_diff": loss_rel, "grad_norm_rel_diff": norm_rel, "grad_proj_diff": proj_rel,
            "tolerance": {"loss": tol_loss, "grad": tol_grad},
            "ok": loss_rel <= tol_loss and norm_rel <= tol_grad and proj_rel <= tol_grad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="1a")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="8b on CUDA, tiny on CPU by default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seq", type=int, default=None, help="default: the phase's data.max_seq_len (tiny: 64)")
    parser.add_argument("--variants", default=None, help="default | explore | cpu | name,name,...")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    parser.add_argument("--out-dir", default=None, help="default: checkpoints/bench_train/")
    parser.add_argument("--profile", default="", help="variant names to profile one step of (CUDA)")
    parser.add_argument("--ddp", action="store_true",
                        help="several GPUs: the trainer's optimizer step on 1 and on --gpus processes (DDP)")
    parser.add_argument("--gpus", type=int, default=2, help="--ddp: processes of the second run")
    parser.add_argument("--micro", type=int, default=2, help="--ddp: micro-batch (8B at 29 GiB: 2, PERFORMANCE.md)")
    parser.add_argument("--accum", type=int, default=4, help="--ddp: accumulation steps per optimizer step")
    parser.add_argument("--ckpt-layers", type=int, default=11, help="--ddp: checkpointed layers (8B shape)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec)

    from cogumi.core.config import resolve_path

    config, phase_name = _load_phase(args.phase, args.overrides)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("8b" if device == "cuda" else "tiny")
    dtype = "bfloat16" if device == "cuda" else "float32"
    seq = args.seq or (config.data.max_seq_len if shape == "8b" else 64)
    names = args.variants or ("default" if device == "cuda" else "cpu")
    names = SETS.get(names, None) or [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"ERROR: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    steps = args.steps or (6 if shape == "8b" else 3)
    out_dir = Path(args.out_dir) if args.out_dir else resolve_path("checkpoints") / "bench_train"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.ddp:
        return ddp_bench(args, config, device, out_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = out_dir / f"bench_train-{phase_name}-{shape}-{stamp}.jsonl"
    profiled = {n.strip() for n in args.profile.split(",") if n.strip()}
    command = "python scripts/bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])

    common = {"device": device, "dtype": dtype, "shape": shape, "seq": seq, "r": config.lora.r,
              "alpha": config.lora.alpha, "target_modules": config.lora.target_modules, "steps": steps,
              "warmup": args.warmup, "out_dir": str(out_dir)}
    results = []

    def record(result: dict) -> None:
        result["command"] = command
        results.append(result)
        with out_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")
        short = {k: result.get(k) for k in ("variant", "tokens_per_s", "mfu", "peak_gib", "micro_batch",
                                            "checkpoint_layers", "error")}
        print(json.dumps(short), flush=True)

    ceiling = None
    if device == "cuda":
        ceiling = _spawn("ceiling", dict(common, name="ceiling"), args.timeout)
        record(ceiling)
    baseline = None
    for name in names:
        spec = dict(common, **VARIANTS[name], name=name)
        spec["seq"] = VARIANTS[name].get("seq", seq)
        spec["profile"] = name in profiled
        if spec.get("budget") == "baseline":
            if baseline and baseline.get("peak_gib"):
                spec["budget_bytes"] = int(baseline["peak_gib"] * GIB)
            else:
                spec["budget_bytes"] = int(1e15)  # CPU, or no baseline: no limit to fit under
        elif spec.get("budget") == "card":
            spec["budget_bytes"] = int(0.92 * _card_bytes()) if device == "cuda" else int(1e15)
        result = _spawn("variant", spec, args.timeout)
        if ceiling and "tokens_per_s" in result:
            best = max((ceiling.get("matmul_tflops") or {}).values(), default=None)
            result["of_measured_matmul"] = round(result["useful_tflops"] / best, 4) if best else None
        if name == "baseline" and "error" not in result:
            baseline = result
        if baseline and "tokens_per_s" in result and name != "baseline":
            if result["seq"] == baseline["seq"]:
                result["speedup_vs_baseline"] = round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)
                if result.get("peak_gib") is not None:
                    result["memory_vs_baseline"] = round(result["peak_gib"] / baseline["peak_gib"], 3)
                result["agreement"] = check_agreement(result, baseline, dtype)
        record(result)

    _print_table(results, ceiling)
    summary = {"out": str(out_path), "variants": [r.get("variant") for r in results],
               "errors": [r["variant"] for r in results if "error" in r],
               "disagreements": [r["variant"] for r in results if r.get("agreement") and not r["agreement"]["ok"]]}
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 1 if summary["errors"] or summary["disagreements"] else 0


def _card_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def _print_table(results: list[dict], ceiling: dict | None) -> None:
    if ceiling and "matmul_tflops" in ceiling:
        print(f"\nceiling on {ceiling.get('gpu')}: bf16 matmul TFLOP/s {ceiling['matmul_tflops']}, "
              f"copy {ceiling.get('copy_tb_s')} TB/s")
    head = f"{'variant':22} {'bs':>3} {'ckpt':>4} {'tok/s':>9} {'x base':>7} {'MFU':>6} {'peak GiB':>8} " \
           f"{'loss':>9} {'agree':>5}"
    print(head)
    for r in results:
        if r.get("variant") == "ceiling":
            continue
        if "error" in r:
            print(f"{r['variant']:22} ERROR {r['error'][:150]}")
            continue
        agree = r.get("agreement", {}).get("ok")
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['variant']:22} {r['micro_batch']:>3} {r['checkpoint_layers']:>4} {r['tokens_per_s']:>9.0f} "
              f"{r.get('speedup_vs_baseline', 1.0):>7.2f} {mfu:>6} {peak:>8} {r['check']['loss']:>9.4f} "
              f"{'-' if agree is None else ('yes' if agree else 'NO'):>5}")


if __name__ == "__main__":
    from cogumi.core.errors import run_main

    run_main(main)
