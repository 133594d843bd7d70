"""The base model and its LoRA: guards first, then weights, in a precision that merges cleanly.

Order matters here. Every check that can refuse a base (quantized in any form, an unvalidated previous phase)
runs on names, config.json and safetensors headers only, before a single weight is read: the origin project's
phase 1A was trained on a 4-bit base and every merge built on it was corrupt (ISSUES_LOG.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogumi.core import hub
from cogumi.core.basecompat import check_lora_against_base, refuse_incompatible_base
from cogumi.core.config import LoraConfig, PhaseConfig, TrainConfig
from cogumi.core.errors import UserError
from cogumi.core.guards import refuse_quantized_base
from cogumi.core.manifest import weights_fingerprint
from cogumi.core.safetensors_io import weight_files
from cogumi.core.stamp import require_validated
from cogumi.train.packed_attention import choose_kernel

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    """Device, precision, attention and process layout, resolved once so the loop has no branches on them."""

    device: torch.device
    dtype: torch.dtype
    attention: str
    rank: int = 0
    world_size: int = 1
    packed_kernel: str | None = None  # attention for packed rows (cogumi.train.packed_attention); None: unpacked
    fast_path: dict = field(default_factory=dict)  # what cogumi.train.fastpath.fast_path applied (set by the caller)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Base:
    """A base model that passed the guards: where it is and what it is."""

    spec: str  # as written in the config
    path: Path  # local folder
    fingerprint: str | None
    unvalidated_warning: str | None  # set when ALLOW_UNVALIDATED=1 admitted a base without its VALIDATED stamp

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in weight_files(self.path))


# ---------------------------------------------------------------- runtime


def resolve_runtime(train: TrainConfig, *, packing: bool) -> Runtime:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _resolve_device(train.device, int(os.environ.get("LOCAL_RANK", 0)))
    dtype = _resolve_dtype(train.dtype, device)
    attention = _resolve_attention(train.attention, device, packing)
    kernel = choose_kernel(device, dtype) if packing else None
    return Runtime(device=device, dtype=dtype, attention=attention, rank=rank, world_size=world_size,
                   packed_kernel=kernel)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but torch sees no CUDA GPU", where="train.device",
                        fix="run `make check` to see why, or use train.device=auto")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32. Never fp16 (this loop has no loss scaler) or quantized."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name not in DTYPES:
        raise UserError(f"train.dtype={name} is not supported for training", where="train.dtype",
                        fix="use bfloat16 (GPU) or float32; float16 would need loss scaling")
    return DTYPES[name]


def _resolve_attention(name: str, device: torch.device, packing: bool) -> str:
    """The model's attention class. Packed rows replace its attention anyway (packed_attention, with flash-attn's
    varlen kernel when installed), so they load sdpa; unpacked rows use flash_attention_2 when installed."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and not packing else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise UserError("train.attention=flash_attention_2 but flash_attn is not importable on a GPU here",
                        where="train.attention", fix="use train.attention=auto (sdpa), or `make setup` on the GPU box")
    if name not in {"sdpa", "eager", "flash_attention_2"}:
        raise UserError(f"unknown train.attention '{name}'", where="train.attention",
                        fix="use auto, sdpa, eager or flash_attention_2")
    return name


# ---------------------------------------------------------------- base model: guards before weights


def build_base(config: PhaseConfig, *, allow_unvalidated: bool = False, plain_base: bool = False) -> Base:
    """Resolve the base to a local folder, refusing quantized, unvalidated, changed or misreadable bases and
    unknown LoRA targets before any weight loads."""
    spec = config.base_model
    folder = hub.local_folder(spec)
    if folder is None:
        refuse_quantized_base(spec)  # names like *-bnb-4bit are refused before anything else, even offline
        path = _fetch_hub_base(spec)
    elif not folder.is_dir():
        raise UserError(f"base model folder not found: {folder}", where="base_model",
                        fix="train and merge the previous phase first (`make train merge validate PHASE=<prev>`), "
                            "or fix base_model in the config")
    else:
        path = folder
    refuse_incompatible_base(path)  # files there, config readable, not a transformers-5 format 4.43 would misread
    refuse_quantized_base(path)  # config.json quantization_config, packed integer dtypes in safetensors headers
    # Stamp, manifest and bytes agree; a phase output without a valid manifest is refused, not taken for a plain base.
    warning = require_validated(path, allow_unvalidated=allow_unvalidated, plain_base=plain_base)
    if warning:
        log.warning("%s; this is recorded in the adapter's manifest", warning)
    check_lora_against_base(config.lora, path)
    return Base(spec=spec, path=path, fingerprint=weights_fingerprint(path), unvalidated_warning=warning)


def _fetch_hub_base(repo_id: str) -> Path:
    # config.json is a few KB: a quantized hub model is refused before its weights download.
    refuse_quantized_base(repo_id, config=hub.fetch_config(repo_id))
    hub.check_room(repo_id)
    log.info("base: downloading %s into the hub cache (once)", repo_id)
    return hub.download(repo_id)


def build_tokenizer(base: Base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if not tokenizer.chat_template:
        raise UserError("the base model's tokenizer has no chat template", where=str(base.path),
                        fix="use an instruct model (e.g. meta-llama/Meta-Llama-3.1-8B-Instruct) as the base")
    return tokenizer


# ---------------------------------------------------------------- model + LoRA


def build_model(config: PhaseConfig, base: Base, runtime: Runtime):
    """Load the base in the runtime dtype and wrap it in a LoRA; returns the peft model on the device."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, torch_dtype=runtime.dtype,
                                                 attn_implementation=runtime.attention)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    # Activation checkpointing is set later, per layer, by layout.choose_layout (probe.set_checkpointing:
    # non-reentrant, so frozen embeddings need no enable_input_require_grads hack, and the fused autograd functions
    # recompute correctly); gradient_checkpointing_enable would checkpoint every layer.
    torch.manual_seed(config.train.seed)  # LoRA A matrices are random: same seed, same start
    # autocast_adapter_dtype keeps the LoRA weights in fp32 on a bf16 base, so AdamW's small updates are not lost.
    model = get_peft_model(model, peft_lora_config(config.lora), autocast_adapter_dtype=True)
    model.peft_config["default"].base_model_name_or_path = base.spec
    model.to(runtime.device)
    if runtime.fast_path.get("fused_lora") and config.lora.dropout > 0:
        log.warning("lora.dropout=%g: the fused bf16 LoRA needs dropout 0, so every LoRA layer takes peft's slower "
                    "float32 path (more time and activation memory; docs/PERFORMANCE.md); set lora.dropout=0.0",
                    config.lora.dropout)
    trainable, total = model.get_nb_trainable_parameters()
    attention = f"packed rows through {runtime.packed_kernel}" if runtime.packed_kernel else runtime.attention
    log.info("model: %s in %s, attention %s, LoRA r=%d on %s: %d trainable of %d parameters (%.3f%%)",
             base.spec, str(runtime.dtype).replace("torch.", ""), attention, config.lora.r,
             config.lora.target_modules, trainable, total, 100 * trainable / total)
    return model


def peft_lora_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules
    if not (targets == "all-linear" or isinstance(targets, list) and targets):
        raise UserError(f"lora.target_modules must be 'all-linear' or a list of module names, got {targets!r}",
                        where="lora.target_modules", fix="e.g. lora.target_modules=all-linear or [q_proj,v_proj]")
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          use_rslora=lora.rslora, rank_pattern=dict(lora.rank_pattern),
                          alpha_pattern=dict(lora.alpha_pattern), bias="none", task_type="CAUSAL_LM")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_record(lora: LoraConfig) -> dict:
    """The LoRA settings as written into the adapter's manifest."""
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules,
            "rslora": lora.rslora, "rank_pattern": dict(lora.rank_pattern), "alpha_pattern": dict(lora.alpha_pattern)}
