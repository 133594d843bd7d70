"""The fast training path (issue 8): fused kernels and related switches, applied before the model loads."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def apply_fast_path(liger: str, device_type: str) -> dict:
    """Patch model classes for the fast path when asked and possible; returns what was applied.

    Called by the trainer and the benchmark before the model is instantiated (Liger patches classes).
    """
    return {"liger": False}
