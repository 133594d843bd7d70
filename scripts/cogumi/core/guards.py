"""Guards that make the origin incidents impossible by construction (see ISSUES_LOG.md).

- refuse_quantized_base: the LoRA-on-a-4-bit-base incident (merged model corrupted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files

QUANTIZED_NAME = re.compile(
    r"(bnb|bitsandbytes|gptq|awq|gguf|exl2|hqq|aqlm|[-_.]?(4|8)[-_]?bit|nf4|fp4|int4|int8|w4a16|w8a8)",
    re.IGNORECASE,
)
# Packed integer dtypes that a bf16/fp16/fp32 checkpoint never stores its linear weights in.
PACKED_DTYPES = {"U8", "I8", "I32", "U32", "I16", "U16", "F8_E4M3", "F8_E5M2"}
QUANT_TENSOR_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".absmax", ".quant_map",
                         ".quant_state", ".nested_absmax", ".SCB", ".weight_format")
WHY_QUANTIZED = (
    "A LoRA trained on a quantized base learns to compensate for its rounding; merged into real weights that "
    "compensation corrupts the model (ISSUES_LOG.md: 'LoRA trained on a 4-bit base')."
)
FIX_QUANTIZED = ("use the full-precision (bf16) base, e.g. meta-llama/Meta-Llama-3.1-8B-Instruct; "
                 "quantize only after merging (`make quantize`)")


def config_reasons(config: dict) -> list[str]:
    """The quantization a model's config.json declares, if any."""
    if not config.get("quantization_config"):
        return []
    method = config["quantization_config"].get("quant_method", "unknown")
    return [f"config.json has quantization_config (quant_method={method})"]


def quantization_reasons(model: str | Path) -> list[str]:
    """Every sign that `model` (a hub id or a local folder) is quantized; empty when none is found."""
    reasons = []
    name = str(model)
    match = QUANTIZED_NAME.search(Path(name).name if Path(name).exists() else name)
    if match:
        reasons.append(f"its name contains '{match.group(0).strip('-_.')}'")
    model_dir = Path(model)
    if not model_dir.is_dir():
        return reasons
    config_path = model_dir / "config.json"
    if config_path.exists():
        reasons += config_reasons(json.loads(config_path.read_text(encoding="utf-8")))
    for path in weight_files(model_dir):
        for tensor, info in tensor_entries(read_header(path)).items():
            if tensor.endswith(QUANT_TENSOR_SUFFIXES):
                reasons.append(f"{path.name} holds quantization state tensor '{tensor}'")
                break
            if tensor.endswith(".weight") and info.get("dtype") in PACKED_DTYPES:
                reasons.append(f"{path.name} stores '{tensor}' as packed {info['dtype']}")
                break
    return reasons


def refuse_quantized_base(model: str | Path, *, role: str = "base model", config: dict | None = None) -> None:
    """Raise a UserError if `model` is quantized in any form. There is deliberately no override.

    `config`: a hub model's config.json, fetched alone so its quantization is refused before any weight downloads.
    """
    reasons = quantization_reasons(model) + config_reasons(config or {})
    if reasons:
        raise UserError(
            f"the {role} '{model}' is quantized ({'; '.join(reasons)}). {WHY_QUANTIZED}",
            where=str(model),
            fix=FIX_QUANTIZED,
        )
