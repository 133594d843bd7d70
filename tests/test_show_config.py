"""`make config`: the resolved config, checked, through the real make, without importing torch."""

from __future__ import annotations

import subprocess
import sys

from cogumi.core.paths import REPO_ROOT, SCRIPTS_DIR


def make_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "config", f"PY={sys.executable}", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=120)


def test_make_config_prints_the_resolved_values_with_overrides():
    done = make_config("PHASE=1a", "ARGS=lora.r=8 train.max_steps=7")
    assert done.returncode == 0, done.stderr
    assert "checked" in done.stdout and "max_steps: 7" in done.stdout and "r: 8" in done.stdout


def test_a_bad_value_is_refused_with_exit_2_and_one_screen():
    # The script itself (make turns every failure into 2, so its code would prove nothing).
    done = subprocess.run([sys.executable, str(SCRIPTS_DIR / "show_config.py"), "--phase", "1a",
                           "train.learning_rate=.nan"], cwd=REPO_ROOT, text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(SCRIPTS_DIR), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "finite number" in done.stderr and "Traceback" not in done.stderr


def test_the_config_check_never_imports_torch():
    code = (f"import runpy, sys\nsys.argv = ['show_config.py', '--phase', '1a']\n"
            f"try:\n    runpy.run_path({str(SCRIPTS_DIR / 'show_config.py')!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(SCRIPTS_DIR), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_a_flag_between_overrides_is_taken_as_a_flag():
    from benchmark import parse_args

    args = parse_args(["--phase", "demo", "validate.max_new_tokens=64", "--limit", "3", "train.max_steps=2"])
    assert args.limit == 3 and args.overrides == ["validate.max_new_tokens=64", "train.max_steps=2"]


def test_an_empty_phase_is_named_as_such_not_as_a_missing_config():
    done = make_config("PHASE=", "ARGS=train.max_steps=3")  # make_run.py checks the make variable
    assert done.returncode != 0 and "PHASE must be a phase name" in done.stderr and "PHASE=1a" in done.stderr
    # the scripts themselves: an override where the phase goes (how `--phase $(PHASE) $(ARGS)` used to read it)
    done = subprocess.run([sys.executable, str(SCRIPTS_DIR / "show_config.py"), "--phase", "train.max_steps=3"],
                          cwd=REPO_ROOT, text=True, capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(SCRIPTS_DIR), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "no phase given" in done.stderr and "PHASE=1a" in done.stderr


def test_a_refused_run_shows_its_refusal_first_not_after_the_config(tmp_path, tiny_base):
    from train_helpers import TRAIN_SCRIPT, write_config

    config = write_config(tmp_path, tiny_base, tmp_path / "missing.jsonl")
    env = {"PYTHONPATH": str(SCRIPTS_DIR), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--phase", str(config)], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).strip().splitlines()
    first = next(i for i, line in enumerate(lines) if "ERROR" in line)
    assert first <= 5 and len(lines) <= 15, "\n".join(lines)  # it came after ~55 lines of resolved config


def test_a_config_path_with_an_equals_sign_is_still_a_path(tmp_path):
    from cogumi.core.config import phase_config_path

    path = tmp_path / "run=2" / "my.yaml"
    assert phase_config_path(str(path)) == path
