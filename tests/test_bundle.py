"""make bundle: one archive a fresh GPU instance can run from — code, locks, configs, docs, small data; no outputs."""

import subprocess
import tarfile

from cogumi.core.paths import REPO_ROOT


def test_bundle_has_what_a_gpu_box_needs_and_nothing_heavy(tmp_path):
    bundle = tmp_path / "out" / "cogumi.tar.gz"
    made = subprocess.run(["make", "-s", "bundle", f"BUNDLE={bundle}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    assert "make setup" in made.stdout  # it says what to do on the other side
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "box", filter="data")
    for needed in ("Makefile", "README.md", "requirements/base.txt", "requirements/gpu.txt",
                   "scripts/setup_env.sh", "scripts/train_phase1a_fullprecision.py",
                   "scripts/merge_adapter_fullprecision.py", "scripts/benchmark.py", "scripts/monitor_disk.py",
                   "scripts/cogumi/core/guards.py", "configs/phase1a.yaml", "data/demo/train.jsonl",
                   "docs/TROUBLESHOOTING.md", "checkpoints/.gitkeep"):
        assert needed in names, needed
    assert not any(n.startswith((".venv", ".git/", "dist")) or "__pycache__" in n for n in names)
    assert not any(n.startswith("checkpoints/") and n != "checkpoints/.gitkeep" for n in names)
    assert not (tmp_path / "out" / "cogumi.tar.gz.partial").exists()
    # The unpacked copy is a working project: its Makefile lists the phase targets.
    help_text = subprocess.run(["make", "-s", "help"], cwd=tmp_path / "box", capture_output=True, text=True,
                               timeout=60).stdout
    for target in ("setup", "train", "merge", "validate", "demo", "monitor"):
        assert f"make {target}" in help_text
