"""Phase configs: defaults in code < configs/<phase>.yaml < `key=value` overrides.

Parsed once into frozen dataclasses; an unknown key fails at load naming the file, the key and the closest
valid key. Output paths are derived from `output_root` + `name`, never written twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from cogumi.core.confcheck import check_values
from cogumi.core.errors import UserError
from cogumi.core.paths import CONFIG_DIR, REPO_ROOT
from cogumi.core.switches import parse_bool
from cogumi.core.tracking import parse_report_to


@dataclass(frozen=True)
class DataConfig:
    # local .jsonl/.json/.parquet/.csv, or a datasets hub id when online; a list of them: a mixture (all their rows)
    train_path: Any = "data/train.jsonl"
    hub_split: str = "train"
    max_seq_len: int = 2048
    packing: bool = True  # whole examples fill rows of max_seq_len; attention never crosses examples (exact)
    shuffle_seed: int = 0
    format: str = "auto"  # auto (by each row's keys) | messages | prompt_response | sharegpt | alpaca
    columns: dict = field(default_factory=dict)  # {prompt: question}: a shape's key -> the file's own column name
    roles: dict = field(default_factory=dict)  # {bot: assistant}: other speaker names -> system | user | assistant
    # The held-out set behind eval_loss, never trained on: a file of its own, or a seeded share of train_path's
    # examples taken before packing. Both empty: no eval_loss.
    eval_path: str | None = None
    eval_fraction: float = 0.0


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0 lets the fused fast path skip a dropout copy of every activation
    target_modules: Any = "all-linear"  # or a list like [q_proj, v_proj]
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None  # null: derived from epochs and the data size
    epochs: float = 1.0
    # micro_batch_size x grad_accum is the effective batch (examples per optimizer step), whatever the number of
    # processes: with N GPUs each accumulates grad_accum / N micro-batches (docs/MULTI_GPU.md).
    micro_batch_size: int = 4  # per process; with checkpoint_layers=auto, the largest the memory probe tries
    grad_accum: int = 4
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"  # auto: bf16 where supported, else fp32; never a quantized type
    attention: str = "auto"  # auto: flash_attention_2 when importable on a GPU, else sdpa
    gradient_checkpointing: bool = True  # false: no activation checkpointing at all
    checkpoint_layers: Any = "all"  # with checkpointing on: all | auto (GPU memory probe) | <number of layers>
    memory_budget_gib: float | None = None  # auto's budget per GPU; null: 90% of the card
    liger: str = "auto"  # fused kernels: auto = on where installed and on a GPU; on; off
    log_every: int = 10
    device: str = "auto"
    report_to: Any = "none"  # none | tensorboard | wandb | a list: views of train_log.jsonl (cogumi.core.tracking)
    eval_every: int | None = None  # held-out loss every N optimizer steps and at the last; null: at every save


@dataclass(frozen=True)
class CheckpointConfig:
    save_steps: int = 2000
    keep_last: int = 2


@dataclass(frozen=True)
class DiskConfig:
    path: str | None = None  # null: the checkpoint folder's filesystem
    warn: float = 60.0
    alert: float = 80.0
    critical: float = 90.0
    interval: int = 600
    margin_mb: int = 1024  # free space kept beyond one more checkpoint
    monitor: bool = True  # run scripts/monitor_disk.py as a sidecar during training


@dataclass(frozen=True)
class MergeConfig:
    verify: bool = True
    verify_prompts: int = 4
    max_abs_diff: float | None = None  # null: 2 x the measured base-dtype noise floor (merge/verify.py)
    min_top1_agreement: float = 0.99


@dataclass(frozen=True)
class ValidateConfig:
    baseline: str | None = None  # null: the phase's base model; a model folder or a samples.jsonl
    tasks: list = field(default_factory=lambda: ["math", "code"])
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 512
    batch_size: int = 8
    gates: dict = field(default_factory=dict)  # {task: {win_min: .., loss_max: .., regression_p_min: .., ...}}
    reference: dict = field(default_factory=dict)  # {task: {win: 6, tie: 70, loss: 24}}: shown in the report, not gated
    data: dict = field(default_factory=dict)  # {task: path or source name}


@dataclass(frozen=True)
class PhaseConfig:
    name: str = "phase"
    base_model: str = "meta-llama/Meta-Llama-3.1-8B-Instruct"
    output_root: str = "checkpoints"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    # Every output path derives from output_root + name.
    @property
    def run_dir(self) -> Path:
        return _resolve(self.output_root) / self.name

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def merged_dir(self) -> Path:
        return _resolve(self.output_root) / f"{self.name}_merged"

    @property
    def validation_dir(self) -> Path:
        return self.merged_dir / "validation"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def resolve_path(path: str) -> Path:
    """A config path relative to the repository root (so `make` and pytest agree)."""
    return _resolve(path)


def phase_config_path(phase: str) -> Path:
    """`1a` -> configs/phase1a.yaml; `demo` -> configs/demo.yaml; a path is taken as given."""
    if phase.endswith((".yaml", ".yml")):
        return Path(phase)
    if not phase.strip() or "=" in phase:
        # `make train PHASE= ARGS=k=v` put the first override where the phase goes.
        raise UserError(f"no phase given (got {phase!r} where the phase name goes)", where="PHASE / --phase",
                        fix=f"name one: PHASE=1a (configs: {', '.join(_known_phases())})")
    for candidate in (CONFIG_DIR / f"phase{phase}.yaml", CONFIG_DIR / f"{phase}.yaml"):
        if candidate.exists():
            return candidate
    raise UserError(f"no config for phase '{phase}'", where=str(CONFIG_DIR),
                    fix=f"use one of: {', '.join(_known_phases())} (e.g. `make train PHASE=1a`)")


def _known_phases() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _build(cls, values: dict, source: str, prefix: str = ""):
    if not isinstance(values, dict):
        raise UserError(f"'{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(values).__name__}",
                        where=source, fix="check the YAML indentation of that section")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'", where=source, fix=hint)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, f"{prefix}{key}", source)
    return cls(**kwargs)


AUTO_ON_OFF = {"train.liger"}  # switches with a third value, auto
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_type(value, hint, key: str, source: str):
    """Accept the YAML value when it fits the annotation; ints pass for floats; numbers must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        # YAML's .nan and .inf pass every range check (nan < 0 and nan > 1 are both False).
        raise UserError(f"'{key}' must be a finite number, got {value!r}", where=f"{source}: {key}",
                        fix=f"give '{key}' a number, e.g. the phase YAML's value")
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    names = set(text.split(" | "))
    if key in AUTO_ON_OFF and value is not None:
        # YAML reads `off`/`no`/`false` as False: the documented train.liger=off must mean off, not an error.
        if value == "auto":
            return value
        try:
            return "on" if parse_bool(value, key, f"{source}: {key}") else "off"
        except UserError:
            raise UserError(f"'{key}' must be auto, on or off, got {value!r}", where=f"{source}: {key}",
                            fix=f"e.g. {key}=auto (also true/false, yes/no, 1/0)") from None
    if names & {"bool"} and not isinstance(value, bool) and value is not None:
        return parse_bool(value, key, f"{source}: {key}")
    if value is None:
        if "None" in names or "Any" in names:
            return None
        raise UserError(f"'{key}' may not be null", where=source, fix=f"give '{key}' a value of type {text}")
    if "float" in names and isinstance(value, str) and _FLOAT.match(value.strip()):
        # PyYAML (YAML 1.1) reads 2e-4 as a string; only 2.0e-4 is a float there. Accept what users write.
        return float(value)
    simple = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "list": list}
    wanted = [simple[name] for name in names if name in simple]
    if "Any" in names or not wanted:
        return value
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in wanted) or not any(isinstance(value, t) for t in wanted):
        raise UserError(f"'{key}' should be {text}, got {value!r}", where=source,
                        fix=f"change '{key}' in the config or the override")
    if "float" in names and "int" not in names and isinstance(value, int) and not is_bool:
        return float(value)
    return value


def parse_overrides(items: list[str]) -> dict:
    """`train.max_steps=50 lora.r=8` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value", where="command line",
                            fix="write overrides like train.max_steps=50")
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise UserError(f"override '{item}': the value is not valid YAML ({getattr(err, 'problem', err)})",
                            where=f"command line: {key.strip()}",
                            fix="quote it or close its brackets, e.g. lora.target_modules=[q_proj,v_proj]") from None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (by default the last one silently wins:
    a repeated `train:` section reset the learning rate)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise UserError(f"key '{key}' appears twice in one section (lines {seen[key]} and "
                                f"{key_node.start_mark.line + 1})", where=f"{self.name}:{key_node.start_mark.line + 1}",
                                fix="keep one of them: YAML would silently use the last")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict:
    """A config file as a dict: UTF-8, valid YAML, no duplicate keys, a mapping at the top (or empty)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise UserError(f"config file not found: {path}", where=str(path),
                        fix="check PHASE= or the path; configs live in configs/") from err
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UserError(f"the config is not UTF-8 text (byte {err.start})", where=f"{path}:{line}",
                        fix="save the file as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"the config path is a folder: {path}", where=str(path),
                        fix="give a .yaml file, or PHASE=1a") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"YAML syntax error: {getattr(err, 'problem', err)}", where=where,
                        fix="fix the YAML at that line") from err
    finally:
        loader.dispose()
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"the config's top level must be a mapping of sections, got a {type(raw).__name__}",
                        where=str(path), fix="start with sections like `train:` and `lora:` (see configs/phase1a.yaml)")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PhaseConfig:
    path = Path(path)
    raw = read_yaml_mapping(path)
    raw.setdefault("name", path.stem)
    values = _merge(raw, parse_overrides(overrides or []))
    config = _build(PhaseConfig, values, str(path))
    _check_combinations(config, str(path))
    check_values(config, str(path))
    return config


def _check_combinations(config: PhaseConfig, source: str) -> None:
    if config.lora.r <= 0:
        raise UserError("lora.r must be positive", where=source, fix="set lora.r to e.g. 16")
    if config.checkpoints.keep_last < 1:
        raise UserError("checkpoints.keep_last must be at least 1", where=source,
                        fix="keep at least the newest checkpoint, e.g. checkpoints.keep_last=2")
    if config.checkpoints.save_steps < 1:
        raise UserError("checkpoints.save_steps must be at least 1", where=source, fix="e.g. save_steps: 2000")
    if not config.disk.warn <= config.disk.alert <= config.disk.critical <= 100:
        raise UserError("disk thresholds must satisfy warn <= alert <= critical <= 100", where=source,
                        fix="e.g. warn: 60, alert: 80, critical: 90")
    _check_checkpointing(config.train, source)
    parse_report_to(config.train.report_to, where=f"{source}: train.report_to")
    if config.train.micro_batch_size < 1 or config.train.grad_accum < 1:
        raise UserError("train.micro_batch_size and train.grad_accum must be at least 1", where=source,
                        fix="e.g. micro_batch_size: 4, grad_accum: 4 (effective batch 16)")


def _check_checkpointing(train: TrainConfig, source: str) -> None:
    layers = train.checkpoint_layers
    if not (layers in ("all", "auto") or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)):
        raise UserError(f"train.checkpoint_layers must be all, auto or a number of layers >= 0, got {layers!r}",
                        where=source, fix="e.g. train.checkpoint_layers=auto (GPU: the memory probe picks)")
    if not train.gradient_checkpointing and layers != "all":
        raise UserError(f"train.checkpoint_layers={layers} needs train.gradient_checkpointing: true", where=source,
                        fix="set train.gradient_checkpointing=true, or leave checkpoint_layers at all")
    if train.memory_budget_gib is not None and (layers != "auto" or train.memory_budget_gib <= 0):
        raise UserError("train.memory_budget_gib is the budget of checkpoint_layers=auto's memory probe (> 0 GiB)",
                        where=source, fix="set train.checkpoint_layers=auto, or train.memory_budget_gib=null")


def resolved_yaml(config: PhaseConfig) -> str:
    """The resolved config as compact YAML, for a screen (`make config`, the train log at DEBUG)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None).rstrip()


def save_resolved(config: PhaseConfig, path: Path) -> None:
    from cogumi.core.fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False))
