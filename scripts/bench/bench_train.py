"""Training-step benchmark: the fast path against plain transformers+peft, side by side, in one call.

    make bench-train PHASE=1a                       # GPU: 8B shape; full rows AND the real-length mix
    python scripts/bench/bench_train.py --shape tiny      # CPU: tiny Llama, seconds (what `make test` runs)
    python scripts/bench/bench_train.py --variants explore --out-dir DIR   # every variant of docs/PERFORMANCE.md
    python scripts/bench/bench_train.py --ddp --gpus 2 --out-dir DIR  # 1 vs 2 GPUs with DDP (bench_ddp.sh)

Builds the phase's architecture with random weights directly on the device (no download; speed and memory do not
depend on the weights), adds LoRA (the phase's r and alpha, all linear layers), and times exactly
`cogumi.train.step.train_step`, the step the trainer runs. Each variant runs in its own process
(cogumi.perf.variant), so kernel patches and allocator state never leak between them.

Two kinds of rows. Full rows: `micro_batch` rows of seq random tokens (the headline of earlier runs). Real lengths
(`*-real`): examples with the token lengths of real conversations (data/bench/length_mix.json: MATH, GSM8K and CoQA
as Llama-3 chats, made by scripts/bench/make_length_mix.py); the baseline pads each micro-batch of 4 to its longest
example, the phase defaults pack whole examples into rows with per-example attention. Reports real (non-pad) tokens/s,
padding fraction, MFU (cogumi.train.flops, the trainer's count: recompute is not useful work) and peak memory, the
mix's mean/median/p90, the attention kernel that ran, and the loss and LoRA gradient of one shared batch, which must
agree with the plain path's within the dtype's tolerance. MFU is against the card's dense bf16 peak (H100/H200 SXM:
989 TFLOP/s) and, beside it, against the bf16 matmul rate measured in the same call.
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

from cogumi.perf.models import GIB, SHAPES  # noqa: E402 - after the sys.path line above

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
    "fast-auto": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline", packed=True,
                      note="phase defaults (packed-row attention) on full rows, layout from the memory probe within "
                           "the baseline's peak"),
    "fast-auto-sdpa": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline",
                           note="fast path, transformers' sdpa attention (K, V repeated), probe within the baseline"),
    "fast-auto-8192": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="card", seq=8192,
                           max_micro_batch=2, note="fast path at seq 8192, layout from the memory probe (92% of card)"),
    "fast-auto-8192-b": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline", seq=8192,
                             max_micro_batch=1, note="fast path at seq 8192 within the seq-2048 baseline's peak"),
    # The phase's defaults exactly as `make train PHASE=1a` runs them on this card: packed rows, micro-batch up to
    # the config's 4, the probe within train.memory_budget_gib: null (90 % of the card).
    "fast-phase": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="phase", packed=True,
                       note="phase defaults on full rows, the probe within 90% of the card (memory_budget_gib null)"),
    "fast-real-phase": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="phase", lengths="mix",
                            packed=True, note="phase defaults on the real mix, the probe within 90% of the card"),
    # Real lengths (the mix of data/bench/length_mix.json); real tokens/s counts non-pad tokens only.
    "baseline-real": dict(PLAIN, dropout=0.05, ckpt="all", micro_batch=4, lengths="mix", packed=False,
                          note="plain transformers+peft on the real mix: padded micro-batches of 4, usual settings"),
    "fast-real": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline", lengths="mix",
                      packed=True, note="phase defaults on the real mix: packed rows, layout from the memory probe"),
    "fast-real-unpacked": dict(FAST, dropout=0.0, ckpt="auto", micro_batch="auto", budget="baseline", lengths="mix",
                               packed=False, note="fast path on the real mix without packing (padded micro-batches)"),
}
SETS = {
    # within the plain baseline's memory (the comparison at equal memory), then the phase's own budget (the run a
    # user makes: 90 % of the card)
    "default": ["baseline", "fast-auto", "fast-phase", "baseline-real", "fast-real", "fast-real-phase"],
    "cpu": ["baseline", "plain-d0", "fast-bs1", "fast-auto", "baseline-real", "fast-real"],
    "real": ["baseline", "baseline-real", "fast-real"],
    "phase": ["baseline", "fast-phase", "baseline-real", "fast-real-phase"],
    "check": ["baseline", "fast-auto", "fast-auto-8192-b"],
    "explore": ["baseline", "fast-auto", "fast-auto-8192", "fast-ckpt-bs4", "fast-peftlora-bs1",
                "fast-ligerloss-bs1", "liger-only", "fast-ck16-bs2", "fast-bs2"],
}


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
        from cogumi.perf.ddp import run_ddp_worker

        result = run_ddp_worker(spec)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    from cogumi.perf.attention import run_attention_kernels
    from cogumi.perf.hardware import run_ceiling
    from cogumi.perf.variant import run_variant

    try:
        result = {"ceiling": run_ceiling, "kernels": run_attention_kernels}.get(kind, run_variant)(spec)
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
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory budget of the probed variants when the full-row baseline is not in the set")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling and the kernel comparison")
    parser.add_argument("--real-examples", type=int, default=None,
                        help="examples of the real-length mix each *-real variant trains on (8B: 160, tiny: 24)")
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
              "warmup": args.warmup, "out_dir": str(out_dir), "lengths": "full",
              "real_examples": args.real_examples or (160 if shape == "8b" else 24)}
    results = []

    def record(result: dict) -> None:
        result["command"] = command
        results.append(result)
        with out_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")
        short = {k: result.get(k) for k in ("variant", "tokens_per_s", "mfu", "padding", "peak_gib", "micro_batch",
                                            "checkpoint_layers", "attention", "error")}
        print(json.dumps(short), flush=True)

    ceiling = None
    real_seq = args.seq or config.data.max_seq_len
    if device == "cuda" and not args.no_ceiling:
        ceiling = _spawn("ceiling", dict(common, name="ceiling"), args.timeout)
        record(ceiling)
        if any(VARIANTS[n].get("packed") for n in names):  # which packed attention kernel, measured here
            kernels = _spawn("kernels", dict(common, name="attention-kernels", seq=real_seq), args.timeout)
            record(kernels)
            print("packed attention kernels: " + json.dumps(kernels.get("kernels") or kernels.get("error")),
                  flush=True)
    baselines: dict = {}  # "full" / "mix" -> the plain baseline of that kind of rows
    fast_full = {}  # memory budget -> the fast path's own full-row figure, for the real-length ratio
    for name in names:
        spec = dict(common, **VARIANTS[name], name=name)
        baseline = baselines.get("full")
        # Real lengths need the run's own rows (tiny full rows are short to keep CPU runs quick; packing into them
        # would pack nothing).
        spec["seq"] = VARIANTS[name].get("seq", real_seq if spec["lengths"] == "mix" else seq)
        spec["profile"] = name in profiled
        if spec.get("budget") == "baseline":
            if baseline and baseline.get("peak_gib"):
                spec["budget_bytes"] = int(baseline["peak_gib"] * GIB)
            elif args.budget_gib:
                spec["budget_bytes"] = int(args.budget_gib * GIB)
            else:
                spec["budget_bytes"] = int(1e15)  # CPU, or no baseline: no limit to fit under
        elif spec.get("budget") == "phase":  # what `train.memory_budget_gib: null` gives the trainer
            from cogumi.train.layout import BUDGET_OF_CARD

            spec["budget_bytes"] = int(BUDGET_OF_CARD * _card_bytes()) if device == "cuda" else int(1e15)
        elif spec.get("budget") == "card":
            spec["budget_bytes"] = int(0.92 * _card_bytes()) if device == "cuda" else int(1e15)
        result = _spawn("variant", spec, args.timeout)
        if ceiling and "tokens_per_s" in result:
            best = max((ceiling.get("matmul_tflops") or {}).values(), default=None)
            result["of_measured_matmul"] = round(result["useful_tflops"] / best, 4) if best else None
        compare(result, name, spec["lengths"], baselines, fast_full.get(spec.get("budget")), dtype)
        if name in ("fast-auto", "fast-phase") and "error" not in result:  # the phase defaults on full rows
            fast_full[spec["budget"]] = result
        record(result)
        if result.get("mix"):
            mix = result["mix"]
            print(f"real-length mix: {mix['n']} conversations, mean {mix['mean']}, median {mix['median']}, "
                  f"p90 {mix['p90']}, max {mix['max']} tokens ({mix['timed_examples']} examples per variant)")

    _print_table(results, ceiling)
    summary = {"out": str(out_path), "variants": [r.get("variant") for r in results],
               "errors": [r["variant"] for r in results if "error" in r],
               "disagreements": [r["variant"] for r in results if r.get("agreement") and not r["agreement"]["ok"]]}
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 1 if summary["errors"] or summary["disagreements"] else 0


def compare(result: dict, name: str, lengths: str, baselines: dict, fast_full: dict | None, dtype: str) -> None:
    """Speed, memory and loss agreement against the plain baseline of the same kind of rows (kept in `baselines`),
    and a real-length figure against the fast path's own full rows."""
    if "tokens_per_s" not in result:
        return
    if name.startswith("baseline"):
        baselines.setdefault(lengths, result)
        return
    baseline = baselines.get(lengths)
    if baseline and result["seq"] == baseline["seq"]:
        result["speedup_vs_baseline"] = round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)
        if result.get("peak_gib") is not None:
            result["memory_vs_baseline"] = round(result["peak_gib"] / baseline["peak_gib"], 3)
        result["agreement"] = check_agreement(result, baseline, dtype)
    if lengths == "mix" and fast_full:
        result["of_fast_full_rows"] = round(result["tokens_per_s"] / fast_full["tokens_per_s"], 3)


def _card_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def _print_table(results: list[dict], ceiling: dict | None) -> None:
    if ceiling and "matmul_tflops" in ceiling:
        print(f"\nceiling on {ceiling.get('gpu')}: bf16 matmul TFLOP/s {ceiling['matmul_tflops']}, "
              f"copy {ceiling.get('copy_tb_s')} TB/s")
    head = f"{'variant':20} {'rows':10} {'bs':>3} {'ckpt':>4} {'tok/s':>9} {'x base':>7} {'pad':>5} {'MFU':>6} " \
           f"{'peak GiB':>8} {'loss':>9} {'agree':>5}  attention"
    print(head)
    for r in results:
        if r.get("variant") in ("ceiling", "attention-kernels"):
            continue
        if "error" in r:
            print(f"{r['variant']:20} ERROR {r['error'][:150]}")
            continue
        agree = r.get("agreement", {}).get("ok")
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['variant']:20} {r['lengths']:10} {r['micro_batch']:>3} {r['checkpoint_layers']:>4} "
              f"{r['tokens_per_s']:>9.0f} {r.get('speedup_vs_baseline', 1.0):>7.2f} {r['padding']:>5.2f} {mfu:>6} "
              f"{peak:>8} {r['check']['loss']:>9.4f} {'-' if agree is None else ('yes' if agree else 'NO'):>5}  "
              f"{r['attention']}")


if __name__ == "__main__":
    from cogumi.core.errors import run_main

    run_main(main)
