"""Quantization benchmark (GPU): size, load time and generation speed of bf16 vs bnb nf4/int8, through
scripts/quantize.py's own `quantize()`.

    python scripts/bench/bench_quantize.py --shapes 1b,8b --json out.json     # on a GPU box (make bench-quantize)

Builds random-weight bf16 Llamas of real shapes (Llama-3.2-1B, Llama-3.1-8B) on the GPU, saves them, quantizes each
with the project's quantize(), then loads bf16 and each quantized folder in turn and times greedy generation.
Random weights are enough: size, load time and kernel speed do not depend on the values.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build(shape: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cogumi.demo.tiny import build_tokenizer

    config = LlamaConfig(**SHAPES[shape], rope_theta=500000.0, max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    build_tokenizer().save_pretrained(folder)  # generation only needs ids; the real vocab size is in the config
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def generation_speed(folder: Path, new_tokens: int = 128, batch: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": 0})
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    ids = torch.randint(100, 30000, (batch, 64), device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {"load_s": round(load_s, 2), "gen_tokens_per_s": round(batch * new_tokens / wall, 1),
              "batch": batch, "new_tokens": new_tokens, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--quants", default="nf4,int8")
    parser.add_argument("--workdir", help="where the models go (default: a temporary folder, deleted)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import bitsandbytes
    import torch
    import transformers

    from cogumi.merge.quantize import quantize, quantized_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quantize-"))
    rows = []
    env = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
           "bitsandbytes": bitsandbytes.__version__}
    print(json.dumps(env), flush=True)
    for shape in args.shapes.split(","):
        merged = build(shape, work / f"{shape}_merged")
        bf16_bytes = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
        rows.append({"shape": shape, "variant": "bf16", "bytes": bf16_bytes, **generation_speed(merged)})
        print(json.dumps(rows[-1]), flush=True)
        for quant in args.quants.split(","):
            out = quantized_dir(merged, quant)
            report = quantize(merged, out, quant)
            rows.append({"shape": shape, "variant": quant, "bytes": report["quantized_bytes"],
                         "quantize_s": report["load_and_quantize_s"], **generation_speed(out)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out)
        shutil.rmtree(merged)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
