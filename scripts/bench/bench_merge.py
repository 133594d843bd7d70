"""Merge benchmark: our streaming merge against peft merge_and_unload + save_pretrained, on the same model.

    python scripts/bench/bench_merge.py                          # 0.85 B bf16 Llama, 4 shards, LoRA r16 on all linear
    python scripts/bench/bench_merge.py --variants streaming+verify --repeat 1    # the cost of the built-in check
    python scripts/bench/bench_merge.py --size 8b --device cuda --workdir /data/bench   # Llama-3.1-8B shape, GPU box
    python scripts/bench/bench_merge.py --variants streaming+verify,peft,cp --repeat 1   # the goals' comparison

Builds a random-weight bf16 Llama in several safetensors shards and a random LoRA (r16, alpha 32, every linear
layer of every block) in a temporary folder (deleted at the end unless --keep), then runs each variant in its
own fresh process and reports wall time and peak RSS of that whole process (os.wait4's rusage: imports, loading
and writing included). Speed and memory do not depend on the weights' values, so random weights are enough.
Each child reports the package versions it imported (it keeps the caller's PYTHONPATH). `cp` is the disk's
floor: a plain copy of the shards, timed with and without the `sync` that our merge's fsync pays for.
Prints a markdown table for docs/PERFORMANCE.md and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cogumi.demo.shapes import SIZES, llama_config

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- building the model and the adapter


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(text[:-2]) * units[text[-2:].upper()])


def build_random_llama(out_dir: Path, size: str, *, seed: int = 0, device: str = "cpu") -> Path:
    """A bf16 Llama folder (config, sharded safetensors, index, tokenizer) with random weights, written shard by
    shard so building it needs one shard of memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from cogumi.demo.tiny import build_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = llama_config(size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    groups = _shard_groups(shapes, parse_size(SIZES[size]["shard"]))
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random_weight(name, shapes[name], generator, device) for name in names}
        save_file(tensors, out_dir / filename, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)  # small byte-level BPE: ids fit any vocabulary above 384
    return out_dir


def _shard_groups(shapes: dict, limit: int) -> list[list[str]]:
    groups, current, used = [], [], 0
    for name, shape in shapes.items():
        size = 2 * _numel(shape)
        if current and used + size > limit:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + [current] if current else groups


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random_weight(name: str, shape: tuple, generator, device: str):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(0.02)
    return t.to(torch.bfloat16).cpu()


def build_random_adapter(base_dir: Path, adapter_dir: Path, *, r: int = 16, alpha: int = 32, seed: int = 1) -> Path:
    """A peft-format LoRA on every linear layer of every block, with non-zero B, plus the trainer's manifest."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from cogumi.core.manifest import sha256_file, weights_fingerprint, write_manifest

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(base_dir)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dims = {"q_proj": (cfg.hidden_size, cfg.hidden_size), "k_proj": (cfg.hidden_size, cfg.num_key_value_heads
            * head_dim), "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
            "o_proj": (cfg.hidden_size, cfg.hidden_size), "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
            "up_proj": (cfg.hidden_size, cfg.intermediate_size), "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (fan_in, fan_out) in dims.items():
            block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * 0.01
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LINEAR), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base_dir)).save_pretrained(adapter_dir)
    write_manifest(adapter_dir, "adapter", base_model=str(base_dir), base_path=str(base_dir),
                   base_fingerprint=weights_fingerprint(base_dir), dtype="float32",
                   lora={"r": r, "alpha": alpha, "rslora": False, "target_modules": list(LINEAR)},
                   trained_on_quantized=False, adapter_hash=sha256_file(adapter_dir / "adapter_model.safetensors"))
    return adapter_dir


# ---------------------------------------------------------------- the variants, each in its own process


def child_streaming(base: str, adapter: str, out: str, device: str, verify: bool) -> dict:
    from cogumi.merge.stream import MergeJob, run_merge

    report = run_merge(MergeJob(base_model=base, adapter_dir=Path(adapter), out_dir=Path(out), verify=verify,
                                force=True, margin_bytes=0, device=device))
    return {"passed": report["passed"], "merge_s": report["merge_seconds"], "seconds": report["seconds"],
            "verification": report["verification"]}


def child_peft(base: str, adapter: str, out: str, device: str, shard: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": torch.device(device).index or 0}} if device != "cpu" else {}
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16, **kwargs)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return {}


def run_copy(base: Path, out: Path) -> dict:
    """A plain `cp` of the shards, then `sync`: what the disk alone costs for the same bytes."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(["cp", *map(str, sorted(base.glob("*.safetensors"))), str(out)], check=True)
    copied = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    return {"variant": "cp", "wall_s": round(copied, 1), "wall_with_sync_s": round(time.perf_counter() - started, 1),
            "peak_rss_gb": 0.0}


def run_child(variant: str, args: argparse.Namespace, base: Path, adapter: Path, out: Path) -> dict:
    """Run one variant in a fresh interpreter: wall time of the whole process, and its own peak RSS (VmHWM,
    reported by the child: ru_maxrss of a vfork+exec child would include this parent's peak)."""
    cmd = [sys.executable, __file__, "--child", variant, "--base", str(base), "--adapter", str(adapter),
           "--out", str(out), "--device", args.device, "--merge-device", args.merge_device, "--size", args.size]
    # The children keep the caller's packages (its PYTHONPATH) and add the cogumi library one folder up.
    pythonpath = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"variant": variant, "wall_s": round(wall, 1), **result}


# ---------------------------------------------------------------- report


def versions() -> dict:
    import peft
    import safetensors
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__}


def table(rows: list[dict]) -> str:
    """Median wall time and peak RSS per variant over its runs (this machine's load varies run to run)."""
    names = {"streaming": "streaming merge (ours, --no-verify)", "peft": "peft merge_and_unload + save_pretrained",
             "streaming+verify": "streaming merge + verification (ours, the default)",
             "cp": "plain `cp` of the shards (no sync; + sync in the JSON)"}
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row)
    med = {v: (statistics.median(r["wall_s"] for r in runs), statistics.median(r["peak_rss_gb"] for r in runs))
           for v, runs in by.items()}
    lines = ["| variant | runs | wall s (median; all runs) | peak RSS GB (median) |", "|---|---|---|---|"]
    lines += [f"| {names[v]} | {len(by[v])} | {med[v][0]:.1f} ({', '.join(str(r['wall_s']) for r in by[v])}) "
              f"| {med[v][1]:.2f} |" for v in by]
    for ours in ("streaming", "streaming+verify"):
        if ours in med and "peft" in med:
            (sw, sr), (pw, pr) = med[ours], med["peft"]
            lines.append(f"\nratio {ours}/peft (medians): wall {sw / pw:.2f}, peak RSS {sr / pr:.2f} "
                         "(goal with verification: wall at most 1, peak RSS at most 0.15)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.9b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where peft's model runs")
    parser.add_argument("--merge-device", default="cpu",
                        help="where our merge computes B @ A: cpu, as `make merge` does (verification uses the GPU "
                             "whenever there is one), or cuda")
    parser.add_argument("--workdir", help="where the random model goes (default: a temporary folder)")
    parser.add_argument("--variants", default="streaming,peft",
                        help="comma list of streaming, peft, streaming+verify (the default merge, with its check), cp")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant, interleaved (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the random model and adapter (reused next time)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child == "peft":
            result = child_peft(args.base, args.adapter, args.out, args.device, SIZES[args.size]["shard"])
        else:
            result = child_streaming(args.base, args.adapter, args.out, args.merge_device,
                                     args.child.endswith("verify"))
        from cogumi.merge.stream import peak_rss_mb

        print(json.dumps({**result, "peak_rss_gb": round(peak_rss_mb() / 1024, 2), "versions": versions()}))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge-"))
    try:
        started = time.perf_counter()
        base, adapter = work / "base", work / "adapter"
        if not (adapter / "manifest.json").exists():  # a kept --workdir is reused: building takes a minute
            build_random_llama(base, args.size, device=args.device)
            build_random_adapter(base, adapter)
        print(f"{args.size} base and adapter ready in {time.perf_counter() - started:.0f} s under {work}", flush=True)
        rows = []
        for variant in args.variants.split(",") * args.repeat:
            out = work / f"out-{variant}"
            rows.append(run_copy(base, out) if variant == "cp" else run_child(variant, args, base, adapter, out))
            shutil.rmtree(out, ignore_errors=True)  # the bench's own output: room for the next variant
            print(json.dumps(rows[-1]), flush=True)
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        # the versions the children imported (the parent's may differ when PYTHONPATH shadows packages)
        ran = {json.dumps(r["versions"], sort_keys=True) for r in rows if "versions" in r}
        summary = {"size": args.size, "device": args.device, "merge_device": args.merge_device,
                   "base_gb": round(weights / 1e9, 2), "shards": len(list(base.glob("*.safetensors"))),
                   "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d"), "versions_children_ran": [json.loads(v) for v in ran],
                   "rows": rows}
        print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
