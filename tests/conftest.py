"""Fixtures shared by the tests: tiny real Llama model folders built once per session on CPU, the trainer tests'
tiny base and data, one intra-op thread, a real tmpfs, and entry scripts run as subprocesses.

No test module imports another: what several share is here, or in a helper module (tmpfs_util, train_helpers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

# The library and entry scripts, and the speed benchmarks (imported by their tests as plain modules). The one path
# worked out from here: scripts/ itself, to import cogumi.core.paths, where every other path comes from.
_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
for folder in (_SCRIPTS, _SCRIPTS / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from cogumi.core.paths import REPO_ROOT, SCRIPTS_DIR  # noqa: E402  (found through the sys.path entry above)

# Tests never reach a hub: everything they load is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _code_judge_opt_in():
    """The code the suite runs is its own (references, and hostile programs written to be caught). On a CI host
    without mount/network namespaces the judge refuses model code unless the user opts in; the suite opts in
    there, as a user would, and the kernel-containment tests skip themselves."""
    from cogumi.judge.sandbox import OPT_IN_ENV, isolation

    if not isolation().contained:
        os.environ.setdefault(OPT_IN_ENV, "1")
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny fp32 Llama in one model.safetensors, with a trained BPE tokenizer and Llama-3 chat template."""
    from cogumi.demo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_sharded_bf16_dir(tmp_path_factory) -> Path:
    """The same architecture in bf16, sharded into several safetensors files with an index."""
    import torch

    from cogumi.demo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_sharded") / "tiny-llama-bf16",
                           max_shard_size="40KB", dtype=torch.bfloat16)


@pytest.fixture()
def env(monkeypatch):
    """The environment without the switches a user may have exported; monkeypatch to set more."""
    for name in ("FORCE", "RESUME", "ALLOW_UNVALIDATED", "RESUME_CHANGED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture()
def run_script():
    """Run an entry script as a real subprocess with the repo's PYTHONPATH; returns CompletedProcess."""
    import subprocess

    def _run(script: str, *args: str, env: dict | None = None, timeout: float = 600, **kwargs):
        full_env = {**os.environ, "PYTHONPATH": str(SCRIPTS_DIR), **(env or {})}
        return subprocess.run([sys.executable, str(SCRIPTS_DIR / script), *args], cwd=REPO_ROOT, env=full_env,
                              capture_output=True, text=True, timeout=timeout, **kwargs)

    return _run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, two threads per tiny matmul thrash (5x slower).
    Trainer test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny fixture with a 10x lm_head. Its lm_head (init std 0.02, hidden 64) caps every logit near 1.3, so
    a LoRA on the inner layers, which cannot change lm_head or the final norm, could not memorise anything."""
    from safetensors.torch import load_file, save_file

    base = tmp_path_factory.mktemp("base") / "tiny-llama"
    shutil.copytree(tiny_model_dir, base)
    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 10
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.fixture(scope="session")
def memorised_data(tmp_path_factory) -> Path:
    """Twelve short rows, in both data layouts, that the tiny base memorises in a few dozen steps."""
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(8)]
    rows += [{"prompt": f"Say {w}.", "response": w} for w in ("fox", "dog", "add", "assert")]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tmpfs(tmp_path):
    """A factory for real tmpfs mounts under tmp_path: `tmpfs(8 * MB)` -> its folder; all unmounted afterwards.
    Skips the test where mounting needs root and there is none."""
    from tmpfs_util import mount_tmpfs, unmount

    mounts = []

    def _mount(size_bytes: int) -> Path:
        mounts.append(mount_tmpfs(tmp_path / f"fs{len(mounts)}", size_bytes))
        return mounts[-1]

    yield _mount
    for where in mounts:
        unmount(where)
