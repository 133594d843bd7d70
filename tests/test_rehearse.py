"""`make rehearse PHASE=demo`: every step for real in a hidden folder, the run card, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_of_the_demo_runs_every_step_prints_the_card_and_leaves_nothing(tmp_path, run_script):
    import demo

    base = tmp_path / "demo_base"
    demo.build_base(base, REPO_ROOT / "data" / "demo" / "train.jsonl")
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir())
    result = run_script("rehearse.py", "--phase", "demo", f"base_model={base}", f"validate.baseline={base}",
                        f"output_root={tmp_path}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "== run card: demo" in out and "GPU-hours" in out and "peak disk" in out, out[-2000:]
    assert "resumed from checkpoint-" in out  # the Ctrl-C'd first run was resumed by the same command
    assert "300 steps" in out  # the prediction is for the real config (train.max_steps: 300), not the rehearsal's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_base"]  # no run folder, no hidden folder left
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir()) == before
