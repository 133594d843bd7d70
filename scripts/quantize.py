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
from pathlib import Path

from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_USER_ERROR, UserError, run_main
from cogumi.core.fsutil import move_aside
from cogumi.core.switches import switch
from cogumi.merge.quantize import QUANTS, check_source, quantize, quantized_dir

log = logging.getLogger("quantize")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, help="phase name (1a) or a config path")
    parser.add_argument("--quant", choices=QUANTS, default="nf4")
    parser.add_argument("--source", help="merged model folder (default: the phase's merged output)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_intermixed_args(argv)


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
