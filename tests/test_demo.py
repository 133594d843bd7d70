"""make demo, end to end: the same scripts, config and gate as `make demo`, on CPU, in a temporary folder.

The gate (configs/demo.yaml) requires the merged model to beat the untrained base on held-out MATH-style and
CODE-style problems with McNemar p < 0.05, so a regression anywhere in train -> merge -> validate fails this test.
"""

import json

import pytest
import yaml

from cogumi.core.integrity import weights_sha256
from cogumi.core.paths import REPO_ROOT
from cogumi.demo import tasks as demo_data


def test_shipped_demo_data_is_the_generators_output_and_held_out_is_disjoint():
    rendered = demo_data.render(demo_data.build())
    for name, text in rendered.items():
        assert (REPO_ROOT / "data" / "demo" / name).read_text(encoding="utf-8") == text, name
    files = demo_data.build()
    train_prompts = {m["content"] for row in files["train.jsonl"] for m in row["messages"] if m["role"] == "user"}
    held_out = [row["prompt"] for row in files["math_test.jsonl"] + files["code_test.jsonl"]]
    assert len(held_out) == 80 and not train_prompts & set(held_out)


@pytest.mark.slow
def test_demo_runs_the_whole_chain_passes_its_gate_and_reuses_on_a_second_run(tmp_path, run_script):
    root = tmp_path / "demo-root"
    first = run_script("demo.py", "--root", str(root), timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    merged = root / "demo_merged"
    for artifact in (root / "demo" / "loss.png", root / "demo" / "adapter" / "manifest.json",
                     root / "demo" / "monitor_disk.log", merged / "merge_report.json",
                     merged / "validation" / "wtl.png", merged / "validation" / "report.md", merged / "VALIDATED"):
        assert artifact.exists(), artifact
    merge_report = json.loads((merged / "merge_report.json").read_text())
    assert merge_report["verification"]["passed"] is True
    assert len(list(merged.glob("model-*.safetensors"))) >= 2  # the streaming path ran over several shards
    report = json.loads((merged / "validation" / "report.json").read_text())
    demo_gates = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())["validate"]["gates"]
    assert report["passed"] is True and set(report["tasks"]) == {"math", "code"}
    for task in ("math", "code"):
        row = report["tasks"][task]
        assert row["counts"]["win"] > row["counts"]["loss"] and row["mcnemar_p"] < 0.05
        assert demo_gates[task]["p_max"] == 0.05
    assert "gates: all passed, VALIDATED" in first.stdout

    second = run_script("demo.py", "--root", str(root), timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    said = second.stdout + second.stderr
    assert "base: reusing" in said
    assert "already finished" in said
    assert "merge: " in said and "reusing it" in said
    assert "already carries its VALIDATED stamp" in said

    # A shard cut short after validation is never reused as merged or as validated: merged and validated again.
    shard = sorted(merged.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 4096)
    third = run_script("demo.py", "--root", str(root), timeout=1200)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "merging again" in third.stdout and "gates: all passed, VALIDATED" in third.stdout
    stamp = json.loads((merged / "VALIDATED").read_text())
    assert stamp["weights_sha256"] == weights_sha256(merged)


def test_demo_opts_in_to_uncontained_code_only_where_the_kernel_cannot_contain_it(monkeypatch):
    """A real phase refuses model code it cannot contain; the demo (its own tiny model's code) opts in and says so."""
    import demo

    from cogumi.judge import sandbox

    monkeypatch.delenv(sandbox.OPT_IN_ENV, raising=False)
    contained = sandbox.Isolation(("unshare",), True, True, True, ())
    uncontained = sandbox.Isolation((), False, False, False, (), ("unshare refused",))
    monkeypatch.setattr(sandbox, "isolation", lambda: contained)
    assert demo.demo_code_opt_in() == {}
    monkeypatch.setattr(sandbox, "isolation", lambda: uncontained)
    assert demo.demo_code_opt_in() == {sandbox.OPT_IN_ENV: "1"}
