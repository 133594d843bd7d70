"""Every config value checked at load, before any folder is created or moved and any model or data is touched.

Types are checked by config._check_type; here: enums, ranges and names, each refusal naming the key, the value and
a valid example (ISSUES_LOG B25: fourteen of these were tracebacks after minutes of loading, or silent).
"""

from __future__ import annotations

import re

from cogumi.core.errors import UserError

# transformers' get_scheduler names that need nothing beyond warm-up and total steps.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
DTYPES = ("auto", "bfloat16", "float32")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
LIGER = ("auto", "on", "off")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIN_SEQ_LEN = 16
DATA_FORMATS = ("auto", "messages", "prompt_response", "sharegpt", "alpaca")
MAX_EVAL_FRACTION = 0.5
# The keys cogumi.train.rows' shapes read (what data.columns may map a file's columns onto), and the chat roles.
SHAPE_KEYS = ("messages", "conversations", "prompt", "response", "instruction", "input", "output", "system")
ROLES = ("system", "user", "assistant")


def _refuse(key: str, value, rule: str, example: str, source: str):
    raise UserError(f"'{key}' must be {rule}, got {value!r}", where=f"{source}: {key}", fix=f"e.g. {key}={example}")


def _range(key: str, value, low, high, source: str, example: str, *, low_open=False, high_open=False) -> None:
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        _refuse(key, value, lo + hi, example, source)


def _enum(key: str, value, allowed, source: str) -> None:
    if value not in allowed:
        raise UserError(f"'{key}' must be one of {', '.join(allowed)}, got {value!r}", where=f"{source}: {key}",
                        fix=f"e.g. {key}={allowed[0]}")


def _check_mapping(key: str, mapping: dict, keys, source: str, example: str) -> None:
    """data.columns (keys: the shapes' keys, values: column names) and data.roles (values: a chat role)."""
    for name, value in mapping.items():
        if keys is not None and name not in keys:
            raise UserError(f"'{key}' maps {name!r}, which no row shape reads", where=f"{source}: {key}",
                            fix=f"map one of {', '.join(keys)} to your column, e.g. {key}={example}")
        allowed = ROLES if keys is None else None
        if not (isinstance(value, str) and value) or (allowed and value not in allowed):
            rule = f"one of {', '.join(allowed)}" if allowed else "a column name"
            raise UserError(f"'{key}.{name}' must be {rule}, got {value!r}", where=f"{source}: {key}",
                            fix=f"e.g. {key}={example}")


def check_values(config, source: str) -> None:
    """Raise a UserError for the first value out of its enum or range."""
    if not PLAIN_NAME.match(config.name) or config.name in {".", ".."}:
        _refuse("name", config.name, "a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')",
                "phase1a", source)
    t, d, lo, v = config.train, config.data, config.lora, config.validate
    _enum("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS, source)
    if t.dtype == "float16":
        raise UserError("'train.dtype' float16 is not a training dtype here (this loop has no loss scaler)",
                        where=f"{source}: train.dtype", fix="use auto, bfloat16 (GPU) or float32")
    _enum("train.dtype", t.dtype, DTYPES, source)
    _enum("train.attention", t.attention, ATTENTION, source)
    _enum("train.liger", t.liger, LIGER, source)
    if not DEVICE.match(str(t.device)):
        _refuse("train.device", t.device, "auto, cpu, cuda or cuda:<n>", "auto", source)
    _range("train.learning_rate", t.learning_rate, 0, 1, source, "2e-4", low_open=True)
    _range("train.warmup_ratio", t.warmup_ratio, 0, 1, source, "0.03")
    _range("train.weight_decay", t.weight_decay, 0, None, source, "0.0")
    _range("train.max_grad_norm", t.max_grad_norm, 0, None, source, "1.0")
    _range("train.epochs", t.epochs, 0, None, source, "1", low_open=True)
    _range("train.max_steps", t.max_steps, 1, None, source, "50 (or null: from epochs)")
    _range("train.log_every", t.log_every, 1, None, source, "10")
    _range("data.max_seq_len", d.max_seq_len, MIN_SEQ_LEN, None, source, "2048")
    paths = d.train_path if isinstance(d.train_path, list) else [d.train_path]
    if not (paths and all(isinstance(p, str) and p.strip() for p in paths)):
        _refuse("data.train_path", d.train_path, "a file or hub id, or a non-empty list of them",
                "[data/a.jsonl,data/b.parquet]", source)
    _enum("data.format", d.format, DATA_FORMATS, source)
    _check_mapping("data.columns", d.columns, SHAPE_KEYS, source, "{prompt: question, response: answer}")
    _check_mapping("data.roles", d.roles, None, source, "{bot: assistant, person: user}")
    _range("data.eval_fraction", d.eval_fraction, 0, MAX_EVAL_FRACTION, source, "0.02", high_open=True)
    if d.eval_path is not None and d.eval_fraction > 0:
        raise UserError("data.eval_path and data.eval_fraction both name a held-out set", where=f"{source}: data",
                        fix="keep one: data.eval_fraction=0 to evaluate on eval_path, or data.eval_path=null")
    if d.eval_path is not None and not str(d.eval_path).strip():
        _refuse("data.eval_path", d.eval_path, "a file path or null", "data/phase1a/eval.jsonl", source)
    _range("train.eval_every", t.eval_every, 1, None, source, "500 (or null: at every checkpoint save)")
    _range("lora.dropout", lo.dropout, 0, 1, source, "0.0", high_open=True)
    _range("lora.alpha", lo.alpha, 0, None, source, "32", low_open=True)
    targets = lo.target_modules
    if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                        and all(isinstance(x, str) and x for x in targets))):
        _refuse("lora.target_modules", targets, "all-linear or a list of module names", "[q_proj,v_proj]", source)
    _range("disk.margin_mb", config.disk.margin_mb, 0, None, source, "1024")
    _range("disk.interval", config.disk.interval, 1, None, source, "600")
    _range("merge.verify_prompts", config.merge.verify_prompts, 1, None, source, "4")
    _range("merge.min_top1_agreement", config.merge.min_top1_agreement, 0, 1, source, "0.99")
    _range("merge.max_abs_diff", config.merge.max_abs_diff, 0, None, source, "null", low_open=True)
    for key in ("limit", "max_new_tokens", "batch_size"):
        _range(f"validate.{key}", getattr(v, key), 1, None, source, "8")
    if not (v.tasks and all(isinstance(x, str) for x in v.tasks)):
        _refuse("validate.tasks", v.tasks, "a non-empty list of task names", "[math,code]", source)
