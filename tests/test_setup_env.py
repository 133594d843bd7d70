"""scripts/setup_env.sh's flash-attn step: a prebuilt wheel or sdpa, never a compile unless asked.

The origin incident: `pip install flash-attn` with no wheel for the stack compiled for 20-40 minutes and often failed.
These tests source the real script and run its step functions in bash against the real .venv.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cogumi.core.paths import REPO_ROOT, SCRIPTS_DIR

SETUP = SCRIPTS_DIR / "setup_env.sh"


def run_step(body: str, *, path_prefix: Path | None = None, extra_env: dict | None = None):
    env = {**os.environ, **(extra_env or {})}
    env["PATH"] = (f"{path_prefix}:" if path_prefix else "") + env["PATH"]
    script = f'source "{SETUP}"; UV=(uv); {body}'
    return subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def fake_gpu_host(tmp_path: Path) -> Path:
    """A PATH folder whose nvidia-smi lists one GPU, as on a rented H100."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def flash_attn_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import flash_attn"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_wheel_name_matches_the_installed_torch_cuda_python_and_abi():
    out = run_step("flash_attn_wheel_name")
    assert out.returncode == 0, out.stderr
    # PyPI's torch 2.3.1 is the CUDA 12.1 build with the pre-C++11 ABI; the release serves it as cu122.
    assert out.stdout.strip() == "flash_attn-2.5.8+cu122torch2.3cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"


def test_no_gpu_means_sdpa_without_any_download():
    out = run_step("install_flash_attn", extra_env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "no NVIDIA GPU here; attention uses sdpa" in out.stdout


@pytest.mark.slow
def test_gpu_host_without_a_reachable_wheel_falls_back_to_sdpa_and_never_compiles(tmp_path):
    assert not flash_attn_installed()
    # Port 9 on loopback refuses at once: the same path as an unreachable release page.
    out = run_step("install_flash_attn", path_prefix=fake_gpu_host(tmp_path),
                   extra_env={"FLASH_ATTN_RELEASES": "http://127.0.0.1:9/releases"})
    assert out.returncode == 0, out.stderr
    assert "prebuilt wheel unreachable" in out.stdout and "using sdpa" in out.stdout
    assert "FLASH_ATTN_BUILD=1" in out.stdout  # says how to opt in to the compile
    assert not flash_attn_installed()
    assert not list((REPO_ROOT / ".cache" / "wheels").glob("*.part"))


@pytest.mark.slow
def test_second_run_of_setup_is_idempotent_and_keeps_the_lock():
    out = subprocess.run(["bash", str(SETUP)], cwd=REPO_ROOT, env={**os.environ, "SKIP_CHECK": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for label in ("uv 0.13.9", "venv (Python 3.11)", "sync locked stack", "flash-attn (GPU hosts only)"):
        assert f"[setup] {label}" in out.stdout
    check = subprocess.run([sys.executable, str(SCRIPTS_DIR / "check_env.py")], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr
