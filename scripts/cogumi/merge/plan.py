"""The merge plan: which adapter tensor changes which base tensor, and by how much (peft 0.12's scaling)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import chain

from cogumi.core.errors import UserError
from cogumi.merge.inputs import Adapter, Shard

PEFT_PREFIX = "base_model.model."
# adapter key suffix -> (kind, role); peft saves Linear/Conv1D LoRA as modules, Embedding LoRA as parameters.
LORA_SUFFIXES = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
                 ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}


@dataclass(frozen=True)
class Update:
    """What happens to one base tensor: a LoRA delta added, and/or (modules_to_save, saved embedding layers,
    trained biases) the base value replaced by the adapter's copy first, as peft does when it loads them."""

    base_key: str
    kind: str  # "linear" | "embedding" | "replace"
    keys: tuple[str, ...]  # adapter tensors consumed: (A, B), (A, B, replacement) or (replacement,)
    scale: float = 1.0
    transpose: bool = False

    @property
    def replacement(self) -> str | None:
        return self.keys[-1] if self.kind == "replace" or len(self.keys) == 3 else None


def plan_updates(adapter: Adapter, shards: list[Shard]) -> dict[str, Update]:
    """Map every adapter tensor onto exactly one base tensor; an adapter key that fits nothing is an error."""
    from safetensors import safe_open

    try:
        with safe_open(adapter.weights, framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as err:  # safetensors raises its own error type for a corrupt file
        raise UserError(f"cannot read {adapter.weights.name}: {err}", where=str(adapter.weights),
                        fix="the adapter file is corrupt: re-save it from the last checkpoint") from err
    base_shapes = {name: tuple(info["shape"]) for shard in shards for name, info in shard.entries.items()}
    modules, replacements, updates = {}, {}, {}
    for key in shapes:
        name = _strip_prefix(key, adapter)
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            kind, role = LORA_SUFFIXES[suffix]
            modules.setdefault((name[: -len(suffix)], kind), {})[role] = key
        elif "lora_" in name:
            raise UserError(f"adapter tensor '{key}' is of a kind the streaming merge does not know",
                            where=str(adapter.weights), fix="merge this adapter with peft's merge_and_unload")
        else:  # a LoRA-wrapped layer saved whole keeps `.base_layer` in its name
            replacements[name.replace(".base_layer.", ".")] = key
    for (module, kind), roles in modules.items():
        if set(roles) != {"A", "B"}:
            raise UserError(f"adapter module '{module}' has lora_{''.join(roles)} but not both A and B",
                            where=str(adapter.weights), fix="the adapter file is incomplete: re-save it")
        base_key = f"{module}.weight"
        replaced = (replacements.pop(base_key),) if base_key in replacements else ()
        transpose = kind == "embedding" or bool(adapter.config.get("fan_in_fan_out"))
        update = Update(base_key=base_key, kind=kind, keys=(roles["A"], roles["B"], *replaced),
                        scale=lora_scale(module, adapter.config, shapes[roles["A"]][0]), transpose=transpose)
        _add(updates, update, base_shapes, adapter)
    for base_key, key in replacements.items():
        _add(updates, Update(base_key=base_key, kind="replace", keys=(key,)), base_shapes, adapter)
    return updates


def _strip_prefix(key: str, adapter: Adapter) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise UserError(f"adapter tensor '{key}' does not start with '{PEFT_PREFIX}'", where=str(adapter.weights),
                        fix="save adapters with peft's save_pretrained")
    return key[len(PEFT_PREFIX):]


def _add(updates: dict, update: Update, base_shapes: dict, adapter: Adapter) -> None:
    if update.base_key not in base_shapes:
        raise UserError(f"adapter tensor '{update.keys[0]}' targets '{update.base_key}', which the base does not "
                        f"have", where=str(adapter.weights),
                        fix="this adapter belongs to another architecture, or targets a tied weight")
    if update.base_key in updates:
        raise UserError(f"two adapter entries change '{update.base_key}'", where=str(adapter.weights),
                        fix="the adapter is inconsistent: re-save it from training")
    updates[update.base_key] = update


def lora_scale(module: str, config: dict, rank: int) -> float:
    """peft 0.12's scaling: the first rank/alpha pattern key matching `.*\\.<key>$` picks both r and alpha."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    key = next((k for k in chain(rank_pattern, alpha_pattern) if re.match(rf".*\.{k}$", module)), module)
    r, alpha = rank_pattern.get(key, config["r"]), alpha_pattern.get(key, config["lora_alpha"])
    if r != rank:
        raise UserError(f"adapter module '{module}' has rank {rank} but adapter_config.json gives it r={r}",
                        where="adapter_config.json r / rank_pattern",
                        fix="the config and the weights disagree: re-save the adapter from training")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


