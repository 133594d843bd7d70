"""The lock files are what the .in files ask for, resolved with the Makefile's fixed date and hashes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from check_env import normalize, read_lock

from cogumi.core.paths import REPO_ROOT, SCRIPTS_DIR

REQ = REPO_ROOT / "requirements"

IN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;#]+))?")


def requested(in_file: Path) -> dict[str, str | None]:
    wanted = {}
    for line in in_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = IN_LINE.match(line)
        assert match, f"{in_file.name}: cannot parse '{line}'"
        wanted[normalize(match.group(1))] = match.group(2)
    return wanted


IN_FILES = sorted(REQ.glob("*.in"))


def test_there_are_lock_inputs():
    assert {p.stem for p in IN_FILES} >= {"base", "dev", "gpu", "eval"}


@pytest.mark.parametrize("in_file", IN_FILES, ids=lambda p: p.name)
def test_lock_has_every_requested_package_at_its_pin(in_file):
    lock = read_lock(in_file.with_suffix(".txt"))
    for name, version in requested(in_file).items():
        assert name in lock, f"{in_file.name} asks for {name} but {in_file.stem}.txt lacks it: run `make lock`"
        if version:
            assert lock[name] == version, f"{name}: {in_file.name} pins {version}, lock has {lock[name]}"


@pytest.mark.parametrize("in_file", IN_FILES, ids=lambda p: p.name)
def test_lock_is_hashed_and_made_with_the_makefile_date(in_file):
    text = in_file.with_suffix(".txt").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    date = re.search(r"^EXCLUDE_NEWER := (\S+)", makefile, re.M).group(1)
    assert f"--exclude-newer {date}" in text, f"{in_file.stem}.txt was not compiled with --exclude-newer {date}"
    assert "--generate-hashes" in text
    pins = [line for line in text.splitlines() if IN_LINE.match(line) and "==" in line]
    assert pins and all(line.rstrip().endswith("\\") for line in pins), "every pin must carry --hash lines"


def test_base_and_dev_locks_forbid_source_builds():
    makefile = (REPO_ROOT / "Makefile").read_text()
    for name in ("base", "dev"):
        line = next(line for line in makefile.splitlines() if f"requirements/{name}.in" in line)
        assert "--no-build" in line, f"make lock must compile {name}.in with --no-build"


def test_gpu_lock_keeps_flash_attn_out_of_the_cpu_stack():
    assert "flash-attn" in read_lock(REQ / "gpu.txt")
    for name in ("base", "dev"):
        assert "flash-attn" not in read_lock(REQ / f"{name}.txt")


def test_numpy_is_1x_in_the_lock():
    assert read_lock(REQ / "base.txt")["numpy"].startswith("1.")


@pytest.mark.slow
def test_check_env_passes_here_and_fails_on_a_drifted_lock(tmp_path):
    script = SCRIPTS_DIR / "check_env.py"
    ok = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "stack check passed" in ok.stdout
    drifted = tmp_path / "base.txt"
    drifted.write_text((REQ / "base.txt").read_text().replace("transformers==4.43.3", "transformers==4.44.0"))
    bad = subprocess.run([sys.executable, str(script), "--lock", str(drifted)], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1
    assert "transformers is 4.43.3, the lock base.txt says 4.44.0" in bad.stderr
    assert "make setup" in bad.stderr
