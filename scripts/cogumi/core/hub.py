"""Where a model lives: a local folder, or a hub id fetched into the hub cache (HF_HOME).

A hub id is checked before any weight downloads: the name and config.json go through the quantized-base guard,
access errors say how to log in, and the weights' size is compared with the free space where the cache lives.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from cogumi.core.config import resolve_path
from cogumi.core.errors import UserError
from cogumi.core.fsutil import free_bytes

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Everything a causal LM needs to load; no .bin/.pth/.gguf duplicates of the same weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken"]
LOGIN_FIX = ("accept the model's licence on huggingface.co, then `huggingface-cli login` "
             "or export HF_TOKEN=<a read token>")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in {"", "0", "false", "False"}


def local_folder(spec: str) -> Path | None:
    """`spec` as a local folder (absolute, or relative to the repository root), or None when it is a hub id.

    A relative path whose first part exists here (`checkpoints/phase1a_merged`) is local even before it exists,
    so a missing previous phase is reported as missing instead of looked up on the hub.
    """
    path = Path(spec).expanduser()
    candidate = path if path.is_absolute() else resolve_path(spec)
    if candidate.exists() or path.is_absolute() or spec.startswith(".") or not HUB_ID.match(spec):
        return candidate
    first = resolve_path(Path(spec).parts[0])
    return candidate if first.is_dir() else None


def fetch_config(repo_id: str) -> dict:
    """Only config.json of a hub model (a few KB): enough to refuse a quantized base before the weights."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id):
        path = hf_hub_download(repo_id, "config.json", local_files_only=is_offline())
    return json.loads(Path(path).read_text(encoding="utf-8"))


def weights_size(repo_id: str) -> int | None:
    """Total bytes of the safetensors files of a hub model, or None offline / when the hub does not say."""
    if is_offline():
        return None
    from huggingface_hub import HfApi

    with _hub_errors(repo_id):
        info = HfApi().model_info(repo_id, files_metadata=True)
    sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    return sum(sizes) or None


def check_room(repo_id: str) -> None:
    """Refuse a download that cannot fit where the hub cache lives (often a small root disk on rented boxes)."""
    from huggingface_hub import constants

    size = weights_size(repo_id)
    cache = Path(constants.HF_HUB_CACHE)
    if size is not None and size > free_bytes(cache):
        raise UserError(f"'{repo_id}' needs {size / 2**30:.1f} GiB but {cache} has {free_bytes(cache) / 2**30:.1f} "
                        "GiB free", where=str(cache),
                        fix="point HF_HOME at the large data volume (e.g. export HF_HOME=/workspace/hf) and rerun")


def download(repo_id: str) -> Path:
    """The hub model's files in the local cache (downloaded once); returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id):
        path = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=is_offline())
    return Path(path)


class _hub_errors:
    """Turn hub exceptions into one-screen UserErrors that say what to do."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            raise UserError(f"'{self.repo_id}' is gated and this machine has no access", where=self.repo_id,
                            fix=LOGIN_FIX) from exc
        if isinstance(exc, RepositoryNotFoundError):
            raise UserError(f"'{self.repo_id}' is not a model on the hub (or it is private)", where=self.repo_id,
                            fix="check base_model in the config; for a private model " + LOGIN_FIX) from exc
        if isinstance(exc, LocalEntryNotFoundError):
            raise UserError(f"'{self.repo_id}' is not in the local hub cache and the hub is unreachable/offline",
                            where=self.repo_id,
                            fix="connect and unset HF_HUB_OFFLINE, or set base_model to a local folder") from exc
        return False
