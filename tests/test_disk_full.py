"""The step-9000 incident, end to end on a real small filesystem (ISSUES_LOG O3).

A tiny model trains on a tmpfs; another writer fills the disk mid-run (what logs, caches and data did in the
incident). The trainer must stop at a save with exit code 3 and a message saying what to free, leave only complete
checkpoints, and after space is freed `train` again must resume and end with the same adapter as an uninterrupted
run. The monitor sidecar must be gone after a normal end, a crash, Ctrl-C and kill -9.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tmpfs_util import fill_file

from cogumi.core.paths import SCRIPTS_DIR
from cogumi.train.checkpoints import COMPLETE, latest_complete, list_complete

TRAIN = SCRIPTS_DIR / "train_phase1a_fullprecision.py"
MB = 1024 * 1024
SAVE_STEPS, MAX_STEPS = 3, 30
FILL_AFTER = 6  # the other writer fills the disk once checkpoint-6 is complete


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(40)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(where: Path, model: Path, data: Path, output_root: Path, *, max_steps=MAX_STEPS,
                 save_steps=SAVE_STEPS) -> Path:
    cfg = where / f"disk_{output_root.name}.yaml"
    cfg.write_text(f"""name: diskrun
base_model: {model}
output_root: {output_root}
data: {{train_path: {data}, max_seq_len: 64}}
lora: {{r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: {max_steps}, micro_batch_size: 2, grad_accum: 1, log_every: 3, seed: 7}}
checkpoints: {{save_steps: {save_steps}, keep_last: 2}}
disk: {{margin_mb: 1, interval: 600}}
""")
    return cfg


def start(cfg: Path, log: Path) -> subprocess.Popen:
    """The trainer as a real subprocess, output to a file (a full pipe must never stall it)."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS_DIR), "RESUME": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(TRAIN), "--phase", str(cfg)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, proc.log.read_text()


def wait_for(proc: subprocess.Popen, text: str, timeout=120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = proc.log.read_text()
        if text in output or proc.poll() is not None:
            return output
        time.sleep(0.05)
    return proc.log.read_text()


def sidecar_pid(output: str) -> int:
    match = re.search(r"disk monitor started \(pid (\d+)", output)
    assert match, f"no sidecar was started:\n{output[-3000:]}"
    return int(match.group(1))


def gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ")[1].startswith("Z"):  # exited, waiting for a reaper
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture()
def small_fs(tmpfs):
    return tmpfs(8 * MB)


@pytest.mark.slow
def test_disk_full_stops_cleanly_then_resumes_to_the_same_adapter(tmp_path, small_fs, tiny_model_dir, data_file):
    import torch
    from safetensors.torch import load_file

    # The uninterrupted reference run on the normal disk (also the sidecar's "normal end"), beside the run whose
    # disk fills: the two are independent, so they share the wall time.
    ref = start(write_config(tmp_path, tiny_model_dir, data_file, tmp_path / "ref"), tmp_path / "ref.log")
    cfg = write_config(tmp_path, tiny_model_dir, data_file, small_fs)
    run_dir = small_fs / "diskrun"
    proc = start(cfg, tmp_path / "full.log")
    filler = small_fs / "someone-elses-cache.bin"
    marker = run_dir / f"checkpoint-{FILL_AFTER}" / COMPLETE
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    st = os.statvfs(small_fs)
    # Leave half a MiB: less than one checkpoint plus the 1 MiB margin, more than the logs need.
    fill_file(filler, st.f_bavail * st.f_frsize - MB // 2)
    code, output = finish(proc)

    ref_code, ref_output = finish(ref)
    assert ref_code == 0, ref_output[-3000:]
    assert gone(sidecar_pid(ref_output)), "the sidecar outlived a normal end"
    reference = adapter_tensors(tmp_path / "ref" / "diskrun")

    assert code == 3, output[-3000:]
    assert "Traceback" not in output
    assert re.search(r"ERROR: (stopped before saving step \d+|the disk filled while saving step \d+)", output)
    assert "fix:   free at least" in output and "make train" in output
    assert gone(sidecar_pid(output)), "the sidecar outlived a disk stop"
    # Only complete checkpoints, no temp folder, and the newest one loads.
    assert sorted(p.name for p in run_dir.glob("*checkpoint-*")) == [p.name for _, p in list_complete(run_dir)]
    last = latest_complete(run_dir)
    step = int(last.name.split("-")[1])
    assert FILL_AFTER <= step < MAX_STEPS
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == step == json.loads((last / COMPLETE).read_text())["step"]
    assert set(load_file(last / "adapter" / "adapter_model.safetensors")) == set(reference)
    assert not (run_dir / "adapter").exists()  # no final adapter from a stopped run

    # Free the space; `train` again resumes and ends exactly where the uninterrupted run did.
    filler.unlink()
    code, output = finish(start(cfg, tmp_path / "resume.log"))
    assert code == 0, output[-3000:]
    assert f"continuing from {last}" in output
    resumed = adapter_tensors(run_dir)
    assert set(resumed) == set(reference)
    for name, tensor in reference.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6, rtol=0), name
    assert [s for s, _ in list_complete(run_dir)] == [MAX_STEPS - SAVE_STEPS, MAX_STEPS]


@pytest.mark.slow
def test_sidecar_is_gone_after_a_crash_ctrl_c_and_kill_9(tmp_path, tiny_model_dir, data_file):
    # Three independent trainers at once (they share the start-up time).
    crash_cfg = write_config(tmp_path, tiny_model_dir, data_file, tmp_path / "crash")
    (tmp_path / "crash" / "diskrun" / "train_log.jsonl").mkdir(parents=True)  # the first log write in the loop
    crash = start(crash_cfg, tmp_path / "crash.log")                          # fails: a real, unhandled crash
    long_runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        cfg = write_config(tmp_path, tiny_model_dir, data_file, tmp_path / sig.name, max_steps=100000,
                           save_steps=1000)
        long_runs[sig] = start(cfg, tmp_path / f"{sig.name}.log")

    for sig, proc in long_runs.items():
        pid = sidecar_pid(wait_for(proc, "disk monitor started"))  # training is inside the sidecar block
        assert not gone(pid, timeout=0.5)
        proc.send_signal(sig)  # to the trainer only, not its process group: the trainer must stop the monitor
        code, output = finish(proc, timeout=60)
        # SIGTERM (a scheduler's stop) takes Ctrl-C's path: exit 130 and one line saying how to continue.
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), output[-3000:]
        assert sig == signal.SIGKILL or "Interrupted: stopped cleanly" in output, output[-3000:]
        assert gone(pid), f"the sidecar outlived {sig.name}"

    code, output = finish(crash)
    assert code == 1 and "IsADirectoryError" in output, output[-3000:]
    assert gone(sidecar_pid(output)), "the sidecar outlived a crash"
