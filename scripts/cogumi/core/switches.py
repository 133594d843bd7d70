"""On/off switches: one parser for the environment variables and for boolean config values.

Each switch has one meaning (ISSUES_LOG B27):
  FORCE=1             replace an existing output (merge, quantize, the demo's steps); the old one is moved aside
  RESUME=0            train from scratch; the previous run folder is moved aside (only once every check passed)
  ALLOW_UNVALIDATED=1 train on a merged phase output that has no VALIDATED stamp (recorded in the manifest)
  RESUME_CHANGED=1    resume a checkpoint saved with different training settings (the keys are logged)
  PLAIN_BASE=1        train on a folder shaped like a phase output (merge report, stamp) that has no manifest.json,
                      as a plain base model (recorded in the adapter's manifest)

Values: 1/0, true/false, yes/no, on/off (any case). Anything else is a one-screen error, never a silent "off":
YAML's own reading of `off` as False is why `train.liger=off` used to be refused.
"""

from __future__ import annotations

import os

from cogumi.core.errors import UserError

ON = frozenset({"1", "true", "yes", "on"})
OFF = frozenset({"0", "false", "no", "off", ""})
SWITCHES = {
    "FORCE": ("0", "replace an existing output (the old one is moved aside, never deleted)"),
    "RESUME": ("1", "0 starts fresh: the previous run folder is moved aside"),
    "ALLOW_UNVALIDATED": ("0", "train on a merged phase output without its VALIDATED stamp"),
    "RESUME_CHANGED": ("0", "resume a checkpoint saved with different training settings"),
    "PLAIN_BASE": ("0", "take a base folder shaped like a phase output but without manifest.json as a plain model"),
}


def parse_bool(value, key: str, where: str) -> bool:
    """True/False from a bool or one of the words above; a UserError naming `key` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ON:
        return True
    if text in OFF:
        return False
    raise UserError(f"'{key}' is a switch, got {value!r}", where=where,
                    fix=f"use {key}=1 or {key}=0 (also true/false, yes/no, on/off)")


def switch(name: str) -> bool:
    """The environment switch `name` (one of SWITCHES), parsed strictly."""
    default, _meaning = SWITCHES[name]
    return parse_bool(os.environ.get(name, default), name, where="environment / make variable")
