"""make quantize PHASE=<p> QUANT=nf4|int8: a deployable bitsandbytes copy of the phase's *merged* bf16 model.

The right order is train full precision -> merge -> optionally quantize (ISSUES_LOG.md: a LoRA trained on a 4-bit
base corrupted the merge). The output folder, checkpoints/<phase>_merged-<quant>/, is refused as a base by training
and merging (its name and its config.json's quantization_config both trip cogumi.core.guards).
Compare it with the bf16 merge as a win/tie/loss table:
    make validate PHASE=1a ARGS="--candidate checkpoints/phase1a_merged-nf4 --baseline checkpoints/phase1a_merged"
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_USER_ERROR, UserError, run_main
from cogumi.core.fsutil import aside_name, atomic_write_json, dir_size, move_aside
from cogumi.core.manifest import read_manifest, weights_fingerprint, write_manifest
from cogumi.core.switches import switch

log = logging.getLogger("quantize")
QUANTS = ("nf4", "int8")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, help="phase name (1a) or a config path")
    parser.add_argument("--quant", choices=QUANTS, default="nf4")
    parser.add_argument("--source", help="merged model folder (default: the phase's merged output)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def quantized_dir(merged: Path, quant: str) -> Path:
    return merged.with_name(f"{merged.name}-{quant}")


def check_source(merged: Path) -> dict:
    manifest = read_manifest(merged)
    if manifest is None or manifest.get("kind") != "merged":
        raise UserError(f"{merged} is not a merged model made by `make merge` (no merged manifest.json)",
                        where=str(merged), fix="run `make merge PHASE=<phase>` first, or pass --source")
    if not (merged / "VALIDATED").exists():
        log.warning("%s has no VALIDATED stamp: quantizing a merge that has not passed `make validate`", merged)
    return manifest


def bnb_config(quant: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantize(merged: Path, out: Path, quant: str) -> dict:
    """Load the bf16 merge through bitsandbytes on GPU 0 and save it; written to a temp name, renamed at the end."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = aside_name(out, "partial")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=bnb_config(quant),
                                                 torch_dtype=torch.bfloat16, device_map={"": 0})
    load_s = time.perf_counter() - start
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(merged).save_pretrained(tmp)
        report = {"quant": quant, "source": str(merged), "load_and_quantize_s": round(load_s, 2),
                  "source_bytes": dir_size(merged) - dir_size(merged / "validation"),
                  "quantized_bytes": dir_size(tmp), "gpu_memory_bytes": model.get_memory_footprint()}
        report["ratio"] = round(report["quantized_bytes"] / max(report["source_bytes"], 1), 3)
        atomic_write_json(tmp / "quantize_report.json", report)
        write_manifest(tmp, "quantized", source=str(merged), source_fingerprint=weights_fingerprint(merged),
                       quant=quant, dtype="bnb-" + quant)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own partial temp folder
        raise
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(phase_config_path(args.phase), args.overrides)
    merged = Path(args.source) if args.source else config.merged_dir
    import torch

    if not torch.cuda.is_available():
        print("quantize needs an NVIDIA GPU (bitsandbytes quantizes on CUDA); none is visible here.")
        return EXIT_USER_ERROR
    check_source(merged)
    out = quantized_dir(merged, args.quant)
    if out.exists():
        if not switch("FORCE"):
            raise UserError(f"{out} already exists", where=str(out),
                            fix="pass FORCE=1 to replace it (the old one is moved aside, not deleted)")
        log.info("moved the old output aside to %s", move_aside(out))
    report = quantize(merged, out, args.quant)
    print(f"{args.quant}: {report['source_bytes'] / 1e9:.2f} GB -> {report['quantized_bytes'] / 1e9:.2f} GB "
          f"({report['ratio']:.0%}), load+quantize {report['load_and_quantize_s']:.1f} s. Saved {out}\n"
          f"Compare with the bf16 merge: make validate PHASE={args.phase} "
          f"ARGS=\"--candidate {out} --baseline {merged}\"")
    return 0


if __name__ == "__main__":
    run_main(main)
