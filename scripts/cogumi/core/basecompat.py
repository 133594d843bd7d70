"""Can the installed transformers read this base correctly? Checked on config files only, before any weight loads.

A model saved by transformers 5.x loads in 4.43 without an error but not as saved: its config keeps the RoPE base
under `rope_parameters`, which 4.43 ignores, so training silently uses rope_theta 10000 instead of 500000 (wrong
positions); its tokenizer_config names a class 4.43 does not have (ISSUES_LOG B26). Also here: the
folder's files are there and readable, and lora.target_modules exist in the architecture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.safetensors_io import weight_files

CONVERT_FIX = ("use a copy saved by transformers 4.x (e.g. the hub repo's original files), or edit config.json: "
               "copy rope_parameters.rope_theta to a top-level rope_theta and the other rope_parameters fields to "
               "rope_scaling, set transformers_version to \"4.43.3\", and in tokenizer_config.json set "
               "tokenizer_class to \"PreTrainedTokenizerFast\"")


def _installed() -> tuple[int, int]:
    from transformers import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        line = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UserError(f"{what} is not valid JSON ({err})", where=f"{path}{line}",
                        fix="re-download the base model, or fix that file") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} is not a JSON object", where=str(path), fix="re-download the base model")
    return data


def read_base_config(folder: Path) -> dict:
    """config.json of a local base folder, with the folder's weights checked to be there."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a model folder", where=str(folder),
                        fix="point base_model at a folder holding config.json, tokenizer files and *.safetensors")
    config = _read_json(path, "the base's config.json")
    if not weight_files(folder):
        raise UserError(f"{folder} has a config.json but no *.safetensors weights", where=str(folder),
                        fix="finish the download / copy of the base model (only safetensors weights are read)")
    return config


def newer_format_reasons(folder: Path, config: dict) -> list[str]:
    """What the installed transformers would misread in this base; empty when it reads it as saved."""
    reasons = []
    saved = str(config.get("transformers_version") or "")
    installed = _installed()
    try:
        saved_major = int(saved.split(".")[0])
    except ValueError:
        saved_major = None
    if saved_major is not None and saved_major > installed[0]:
        reasons.append(f"config.json was written by transformers {saved}, this stack has "
                       f"{installed[0]}.{installed[1]}")
    if "rope_parameters" in config and "rope_theta" not in config:
        theta = (config.get("rope_parameters") or {}).get("rope_theta")
        reasons.append(f"its RoPE base is under rope_parameters (rope_theta {theta}), which this transformers "
                       "ignores: it would train with the default rope_theta 10000, the wrong positions")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok_class = _read_json(tok_path, "the base's tokenizer_config.json").get("tokenizer_class")
        if isinstance(tok_class, str) and not _tokenizer_class_known(tok_class):
            reasons.append(f"tokenizer_config.json names tokenizer_class {tok_class}, which this transformers "
                           "does not have")
    return reasons


def _tokenizer_class_known(name: str) -> bool:
    import transformers

    return any(hasattr(transformers, n) for n in (name, name.removesuffix("Fast"), name + "Fast"))


def refuse_incompatible_base(folder: Path) -> dict:
    """The base's config.json when the installed transformers reads this base as it was saved; else UserError."""
    config = read_base_config(folder)
    reasons = newer_format_reasons(Path(folder), config)
    if reasons:
        raise UserError("the base was saved in a newer transformers format that this stack would misread: "
                        + "; ".join(reasons), where=str(Path(folder) / "config.json"), fix=CONVERT_FIX)
    return config


def linear_modules(folder: Path) -> dict[str, tuple[int, int]]:
    """Every Linear module of the base's architecture, full name -> (in, out) features, built on the meta device
    (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def check_lora_against_base(lora, folder: Path) -> None:
    """Before any weight loads: target_modules name Linear modules of this architecture; every rank_pattern and
    alpha_pattern key matches one (peft ignores a key that matches nothing); no rank exceeds the smaller side of a
    module it applies to (a rank above it trains parameters that cannot add rank: lora.r=100000 on a 128-wide model
    trained 819 M parameters)."""
    modules = linear_modules(folder)
    short = {name.rsplit(".", 1)[-1] for name in modules}
    if lora.target_modules == "all-linear":
        targeted = {name: dims for name, dims in modules.items() if not name.endswith("lm_head")}  # as peft does
    else:
        unknown = [t for t in lora.target_modules if t not in short]
        if unknown:
            raise UserError(f"lora.target_modules {unknown} are not Linear modules of this base",
                            where=f"lora.target_modules (base {folder})",
                            fix=f"use all-linear or some of: {', '.join(sorted(short))}")
        targeted = {name: dims for name, dims in modules.items() if name.rsplit(".", 1)[-1] in lora.target_modules}
    for key, rank in lora.rank_pattern.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"lora.rank_pattern[{key!r}] must be a positive whole rank, got {rank!r}",
                            where=f"lora.rank_pattern (base {folder})", fix="e.g. lora.rank_pattern={q_proj: 32}")
    for key_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(lora, key_name):
            if not any(_pattern_matches(key, name) for name in targeted):
                raise UserError(f"lora.{key_name} key {key!r} matches none of the modules LoRA trains",
                                where=f"lora.{key_name} (base {folder})",
                                fix=f"name a targeted module, e.g. {sorted(short - {'lm_head'})[0]} or "
                                    f"layers.0.self_attn.q_proj; peft would silently ignore it")
    for name, (fan_in, fan_out) in targeted.items():
        # peft takes the first matching key of rank_pattern then alpha_pattern, and that key's rank if it has one.
        key = next((k for k in [*lora.rank_pattern, *lora.alpha_pattern] if _pattern_matches(k, name)), None)
        rank = lora.rank_pattern.get(key, lora.r)
        if rank > min(fan_in, fan_out):
            raise UserError(f"LoRA rank {rank} exceeds {name}'s smaller side ({fan_in} in, {fan_out} out): a rank "
                            "above it cannot add rank, it only adds parameters", where=f"lora.r (base {folder})",
                            fix=f"use lora.r <= {min(fan_in, fan_out)} (typical: 8-64)")


def _pattern_matches(key: str, name: str) -> bool:
    """peft 0.12's rule for rank_pattern / alpha_pattern keys: a regex matching a suffix after a dot (so a module's
    full name, which has no dot before it, matches nothing)."""
    try:
        return re.match(rf".*\.{key}$", name) is not None
    except re.error as err:
        raise UserError(f"lora pattern key {key!r} is not a valid regular expression ({err})",
                        where="lora.rank_pattern / lora.alpha_pattern", fix="e.g. q_proj or layers\\.0\\..*") from None
