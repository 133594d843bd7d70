"""A deployable bitsandbytes copy (nf4 / int8) of a *merged* bf16 model, for `make quantize` (scripts/quantize.py).

Quantization comes after the merge, never before training (ISSUES_LOG O2). The output folder,
<merged>-<quant>/, is refused as a base by training and merging (its name and its config.json's
quantization_config both trip cogumi.core.guards).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import aside_name, atomic_write_json, dir_size
from cogumi.core.integrity import weights_sha256
from cogumi.core.manifest import read_manifest, weights_fingerprint, write_manifest

log = logging.getLogger(__name__)
QUANTS = ("nf4", "int8")


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
        # Whole-file hashes, as the merge records them: `make validate --candidate` checks the bytes it judges.
        write_manifest(tmp, "quantized", source=str(merged), source_fingerprint=weights_fingerprint(merged),
                       quant=quant, dtype="bnb-" + quant, weights_sha256=weights_sha256(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own partial temp folder
        raise
    return report
