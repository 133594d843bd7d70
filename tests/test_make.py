"""The Makefile passes PHASE, ARGS and the switches to the scripts as data, through the real `make` (ISSUES_LOG B50).

Every case runs make for real (not `make -n`) with a harmless target (the disk monitor's one reading, or a dry run
that prints the argv) and checks that the canary file the payload would create does not exist. Exit codes come back
per phase in LAST_EXIT.<run> (ISSUES_LOG B51).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cogumi.core.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PHASE", "ARGS", "FORCE", "MAKEFLAGS")}
    return subprocess.run(["make", "--no-print-directory", f"PY={sys.executable}", *args], cwd=REPO_ROOT,
                          env={**environment, **(env or {})}, capture_output=True, text=True, timeout=timeout)


# `{c}` is the canary file: the payload creates it if any shell or make ever evaluates it.
PAYLOADS = ["demo;touch {c}", "demo && touch {c}", "$(touch {c})", "`touch {c}`", "demo' ; touch {c} ; '",
            'demo" ; touch {c} ; "', "demo touch {c}", "$(shell touch {c})", "demo\ntouch {c}"]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_a_phase_that_is_not_a_name_is_refused_and_runs_nothing(tmp_path, payload):
    canary = tmp_path / "pwned"
    result = make("monitor", f"PHASE={payload.format(c=canary)}", "ARGS=--once", f"LAST_EXIT={tmp_path}/le")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ERROR: PHASE must be a phase name" in result.stderr, result.stderr
    assert not canary.exists()
    assert (tmp_path / "le").read_text() == "2\n"


@pytest.mark.parametrize("variable", ["ARGS", "FORCE", "GPUS", "LAST_EXIT"])
@pytest.mark.parametrize("payload", PAYLOADS[:-1], ids=range(len(PAYLOADS) - 1))
def test_no_other_variable_reaches_a_shell(tmp_path, variable, payload):
    """The monitor really runs; a bad ARGS makes its argparse refuse (exit 2) and nothing else happens."""
    canary = tmp_path / "pwned"
    settings = {"ARGS": "--once", "LAST_EXIT": f"{tmp_path}/le", variable: payload.format(c=canary)}
    if variable == "ARGS":
        settings[variable] = "--once " + settings[variable]
    result = make("monitor", "PHASE=demo", *(f"{k}={v}" for k, v in settings.items()))
    assert not canary.exists(), result.stderr
    assert "Traceback" not in result.stderr


def test_args_arrive_as_the_words_a_shell_would_split(tmp_path):
    canary = tmp_path / "pwned"
    args = f'train.max_steps=2 "name=a b" ; touch {canary} $(touch {canary}) `touch {canary}` \'it"s\''
    result = make("train", "PHASE=demo", f"ARGS={args}", "GPUS=2", env={"COGUMI_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout.strip().splitlines()[-1])
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "scripts/train_phase1a_fullprecision.py", "--phase", "demo", "train.max_steps=2", "name=a b",
                        ";", "touch", str(canary), "$(touch", f"{canary})", "`touch", f"{canary}`", 'it"s']
    assert not canary.exists()
    unclosed = make("train", "PHASE=demo", "ARGS=name='a b", f"LAST_EXIT={tmp_path}/le")
    assert unclosed.returncode == 2 and "ARGS cannot be split into words" in unclosed.stderr


def test_monitor_exit_code_is_passed_through_one_file_per_phase(tmp_path):
    """make says 2 whatever failed; the monitor's own code (30: critical) is in LAST_EXIT.<run>, per phase."""
    critical = "ARGS=--once --json --warn 0 --alert 0 --critical 0"
    for phase, run in (("demo", "demo"), ("1a", "phase1a")):
        result = make("monitor", f"PHASE={phase}", critical, f"LAST_EXIT={tmp_path}/le")
        assert result.returncode == 2, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1])["level"] == "critical"
        assert (tmp_path / f"le.{run}").read_text() == "30\n"
    fine = make("monitor", "PHASE=demo", "ARGS=--once --warn 100 --alert 100 --critical 100",
                f"LAST_EXIT={tmp_path}/le")
    assert fine.returncode == 0, fine.stderr
    assert (tmp_path / "le.demo").read_text() == "0\n" and (tmp_path / "le.phase1a").read_text() == "30\n"
    assert (tmp_path / "le").read_text() == "0\n"  # the latest of any phase


@pytest.mark.slow
def test_make_train_still_trains_with_args(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}?", "response": f"{2 * i}"}) + "\n" for i in range(8)))
    config = tmp_path / "maketest.yaml"
    config.write_text(yaml.safe_dump({"name": "maketest", "base_model": str(tiny_model_dir),
                                      "output_root": str(tmp_path / "out"),
                                      "data": {"train_path": str(data), "max_seq_len": 32},
                                      "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
                                      "disk": {"monitor": False, "margin_mb": 1}}))
    result = make("train", f"PHASE={config}", "ARGS=train.max_steps=2 train.micro_batch_size=2 train.grad_accum=1",
                  f"LAST_EXIT={tmp_path}/le", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "maketest" / "adapter" / "manifest.json").read_text())
    assert manifest["steps"] == 2
    assert (tmp_path / "le.maketest").read_text() == "0\n"
    assert not Path(REPO_ROOT / "le.maketest").exists()
