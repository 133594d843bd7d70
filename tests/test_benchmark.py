"""benchmark.py and its library: generation on the tiny model, reports, stored baselines, and the whole
`make validate` flow as a real subprocess (exit code and VALIDATED stamp follow the gates)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cogumi.core.errors import EXIT_DISK_STOP, UserError
from cogumi.core.integrity import weights_sha256
from cogumi.core.manifest import write_manifest
from cogumi.core.stamp import VALIDATED_STAMP
from cogumi.evaluate.generate import end_of_turn_ids, generate, load_model, tokens_until_stop
from cogumi.evaluate.pairing import check_gates, evaluate_gates, summarize
from cogumi.evaluate.records import Problem
from cogumi.evaluate.report import (
    REPORT_FILES,
    ReportDiskStop,
    baseline_outputs,
    read_baseline_samples,
    render_markdown,
    write_reports,
)

# --- generation ----------------------------------------------------------------------------------------------


def test_generation_is_greedy_ordered_and_batch_independent(tiny_model_dir):
    loaded = load_model(tiny_model_dir, device="cpu")
    assert loaded.tokenizer.padding_side == "left" and loaded.dtype == "float32"
    prompts = ["What is 12 + 30?", "hi", "def add(a, b):\n    return a + b", "The quick brown fox"]
    batched = generate(loaded, prompts, max_new_tokens=6, batch_size=3)
    single = generate(loaded, prompts, max_new_tokens=6, batch_size=1)
    # Left padding + attention mask: a prompt's answer does not depend on its batch neighbours or the order.
    assert batched.texts == single.texts
    reversed_ = generate(loaded, prompts[::-1], max_new_tokens=6, batch_size=4)
    assert reversed_.texts == batched.texts[::-1]
    assert 0 < batched.new_tokens <= 6 * len(prompts)
    stats = batched.stats()
    assert stats["prompts"] == 4 and stats["wall_s"] > 0 and stats["tokens_per_s"] > 0
    long = generate(loaded, prompts, max_new_tokens=64, batch_size=4)
    # capped: the rows that ran into max_new_tokens; a row that stopped on its own is the same with more room
    assert set(batched.capped) <= set(range(4)) and set(long.capped) <= set(batched.capped)
    assert all(long.texts[i] == batched.texts[i] for i in range(4) if i not in batched.capped)


def test_stop_ids_come_from_generation_config(tiny_model_dir):
    loaded = load_model(tiny_model_dir, device="cpu")
    eot = loaded.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos = loaded.tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert set(loaded.stop_ids) == {eot, eos}

    class GenConfig:
        eos_token_id = 7

    assert end_of_turn_ids(GenConfig(), loaded.tokenizer) == [7, eot]
    # Tokens after a row's first stop token are padding, not generated work.
    assert tokens_until_stop([5, 6, eot, 0, 0], [eot]) == 3
    assert tokens_until_stop([5, 6, 9], [eot]) == 3


# --- reports and stored baselines --------------------------------------------------------------------------


def _problems(n=4):
    return [Problem(task="math", id=f"m{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(n)]


def _report(passed: bool):
    summary = summarize(["win", "tie_right", "tie_right", "loss"])
    summary.update(source="tests.jsonl", generation={"candidate": {"prompts": 4, "new_tokens": 40, "wall_s": 2.0,
                                                                   "tokens_per_s": 20.0}, "baseline": None})
    gates = evaluate_gates({"math": summary}, check_gates({"math": {"win_min": 25 if passed else 30}}, ["math"]))
    return {"phase": "demo", "created": "2026-11-25T12:00:00", "passed": passed, "candidate": "/c", "baseline": "/b",
            "baseline_stored": True, "limit": None, "seed": 0, "max_new_tokens": 8, "batch_size": 4,
            "tasks": {"math": summary}, "gates": [g._asdict() for g in gates]}


def test_reports_are_written_and_readable(tmp_path):
    samples = [{"task": "math", "id": p.id, "prompt": p.prompt, "outcome": "win",
                "candidate": {"output": f"\\boxed{{{p.answer}}}", "passed": True, "reason": "passed",
                              "extracted": p.answer},
                "baseline": {"output": "no idea", "passed": False, "reason": "no answer", "extracted": None}}
               for p in _problems()]
    paths = write_reports(tmp_path / "validation", _report(passed=False), samples)
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == sorted(paths)  # no temp files left
    assert paths["wtl.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report.md"].read_text()
    assert "FAIL" in md and "| win | 1 | 25.0 |" in md and "| win_min | 25 | 30 | **FAIL** |" in md
    assert "Note: unreachable: the baseline is right on 75.0 % of math problems" in md
    assert "| baseline | stored samples |" in md and "| candidate | 4 | 40 | 2.00 | 20.0 |" in md
    assert json.loads(paths["report.json"].read_text())["tasks"]["math"]["mcnemar_p"] == 1.0
    # An earlier run's samples.jsonl stands in for a baseline: its *candidate* outputs become the baseline's.
    stored = read_baseline_samples(paths["samples.jsonl"])
    assert baseline_outputs(stored, "math", _problems(), paths["samples.jsonl"]) == [
        "\\boxed{0}", "\\boxed{2}", "\\boxed{4}", "\\boxed{6}"]
    assert "PASS" in render_markdown(_report(passed=True))


def test_stored_baseline_must_cover_the_same_problems(tmp_path):
    path = tmp_path / "external.jsonl"
    rows = [{"task": "math", "id": p.id, "prompt": p.prompt, "output": "\\boxed{1}"} for p in _problems(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stored = read_baseline_samples(path)
    with pytest.raises(UserError, match="1 of 4 math problems have no stored baseline output"):
        baseline_outputs(stored, "math", _problems(4), path)
    reworded = [Problem(task="math", id="m0", prompt="Compute 0 + 0.", answer="0")]
    with pytest.raises(UserError, match="prompts differ"):
        baseline_outputs(stored, "math", reworded, path)
    path.write_text(json.dumps({"task": "math", "id": "m0"}) + "\n")
    with pytest.raises(UserError, match="needs task, id and output"):
        read_baseline_samples(path)


# --- the entry script, as `make validate` runs it -------------------------------------------------------------


def _write_config(tmp_path: Path, validate: dict, name: str = "phasex") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_root": str(tmp_path), "base_model": "unused/hub-id",
                                    "validate": validate}, sort_keys=False))
    return path


def test_missing_candidate_says_merge_first(tmp_path, run_script):
    config = _write_config(tmp_path, {"gates": {"math": {"win_min": 6}}})
    result = run_script("benchmark.py", "--phase", str(config), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "candidate model folder not found" in result.stderr and "make merge PHASE=" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_gate_is_refused_before_any_work(tmp_path, run_script, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "phasex_merged")
    config = _write_config(tmp_path, {"gates": {"math": {"wins_min": 6}}})
    result = run_script("benchmark.py", "--phase", str(config), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown gate 'wins_min'" in result.stderr and "did you mean 'win_min'" in result.stderr
    assert not (tmp_path / "phasex_merged" / "validation").exists()


# Answers of nine digits: the tiny random model, held to 8 new tokens, cannot produce one by chance (the MATH
# judge also accepts a bare last number), so its outcomes are known: it is always wrong.
MATH_ROWS = [{"task": "math", "id": f"m{i}", "prompt": f"What is {i} times 111111111?",
              "answer": str(111111111 * i)} for i in range(1, 5)]


CODE_ROWS = [{"task": "code", "id": f"c{i}", "prompt": f"Write add{i}(a, b) returning a + b.",
              "tests": f"assert add{i}(2, 3) == 5\nassert add{i}(-1, 1) == 0\n", "entry_point": f"add{i}"}
             for i in range(1, 3)]


def _validate_setup(tmp_path: Path, tiny_model_dir: Path, gates: dict) -> tuple[Path, Path]:
    """A candidate folder, local MATH and CODE tasks, and a stored baseline right on m1, m2 and c1 only."""
    candidate = tmp_path / "phasex_merged"
    shutil.copytree(tiny_model_dir, candidate)
    # a finished merge's manifest: validation judges and stamps only weights whose every file hash is recorded
    write_manifest(candidate, "merged", base_model="tiny", weights_sha256=weights_sha256(candidate))
    for name, rows in (("math", MATH_ROWS), ("code", CODE_ROWS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    baseline_rows = [{"task": "math", "id": r["id"], "prompt": r["prompt"],
                      "output": f"So the product is \\boxed{{{r['answer'] if i < 2 else 7}}}."}
                     for i, r in enumerate(MATH_ROWS)]
    baseline_rows += [{"task": "code", "id": "c1", "output": "```python\ndef add1(a, b):\n    return a + b\n```"},
                      {"task": "code", "id": "c2", "output": "```python\ndef add2(a, b):\n    return a - b\n```"}]
    baseline = tmp_path / "baseline_samples.jsonl"
    baseline.write_text("".join(json.dumps(r) + "\n" for r in baseline_rows))
    config = _write_config(tmp_path, {"data": {"math": str(tmp_path / "math.jsonl"),
                                               "code": str(tmp_path / "code.jsonl")},
                                      "baseline": str(baseline), "max_new_tokens": 8, "batch_size": 2,
                                      "gates": gates})
    return config, candidate


@pytest.mark.slow
def test_validate_end_to_end_stamp_follows_the_gates(tmp_path, run_script, tiny_model_dir):
    # Expected outcomes: m1, m2 losses (baseline right), m3, m4 ties (both wrong): 0 % win, 50 % tie, 50 % loss.
    # CODE: c1 a loss (baseline's program passes), c2 a tie (its program is wrong).
    gates = {"math": {"tie_min": 50, "loss_max": 50}, "code": {"tie_wrong_min": 50, "win_max": 0}}
    config, candidate = _validate_setup(tmp_path, tiny_model_dir, gates)
    passing = run_script("benchmark.py", "--phase", str(config), timeout=300)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "PASSED: all 4 gates" in passing.stdout
    stamp = json.loads((candidate / VALIDATED_STAMP).read_text())
    assert stamp["report"] == str(candidate / "validation" / "report.json")
    assert stamp["n"] == {"math": 4, "code": 2}
    assert [(g["task"], g["gate"], g["value"], g["passed"]) for g in stamp["gates"]] == [
        ("math", "tie_min", 50.0, True), ("math", "loss_max", 50.0, True),
        ("code", "tie_wrong_min", 50.0, True), ("code", "win_max", 0.0, True)]
    validation = candidate / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["report.json", "report.md", "samples.jsonl", "wtl.png"]
    report = json.loads((validation / "report.json").read_text())
    assert report["passed"] and report["baseline_stored"]
    math = report["tasks"]["math"]
    assert math["counts"] == {"win": 0, "tie_right": 0, "tie_wrong": 2, "loss": 2, "tie": 2}
    assert math["mcnemar_p"] == 0.5 and math["generation"]["baseline"] is None
    assert math["generation"]["candidate"]["prompts"] == 4 and math["generation"]["candidate"]["tokens_per_s"] > 0
    code = report["tasks"]["code"]
    assert code["counts"] == {"win": 0, "tie_right": 0, "tie_wrong": 1, "loss": 1, "tie": 1}
    samples = [json.loads(line) for line in (validation / "samples.jsonl").read_text().splitlines()]
    assert [(s["id"], s["outcome"], s["baseline"]["passed"]) for s in samples] == [
        ("m1", "loss", True), ("m2", "loss", True), ("m3", "tie_wrong", False), ("m4", "tie_wrong", False),
        ("c1", "loss", True), ("c2", "tie_wrong", False)]
    assert samples[5]["baseline"]["reason"].startswith("failed") and not samples[5]["candidate"]["passed"]
    assert samples[0]["baseline"]["extracted"] == "111111111" and samples[0]["prompt"] == MATH_ROWS[0]["prompt"]
    # Every verdict can be audited from the row alone: gold (MATH answer, code tests), extracted, rule/reason.
    assert samples[0]["gold"] == MATH_ROWS[0]["answer"] and samples[4]["gold"] == CODE_ROWS[0]["tests"]
    assert samples[0]["baseline"]["reason"] == "passed (normalized strings)"
    assert all(s["candidate"]["judge_error"] is False for s in samples)
    assert "| loss | 2 | 50.0 |" in (validation / "report.md").read_text()

    # The origin project's MATH expectation fails on this candidate: exit 1, the earlier stamp is gone.
    failing = run_script("benchmark.py", "--phase", str(config), "validate.gates.math.win_min=6",
                         "validate.gates.math.tie_min=70", timeout=300)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert not (candidate / VALIDATED_STAMP).exists()
    assert "FAILED: 2 of 5 gates" in failing.stdout
    assert "math tie_min: 50 % < 70 % FAIL" in failing.stdout and "math win_min: 0 % < 6 % FAIL" in failing.stdout
    assert "Traceback" not in failing.stderr
    assert json.loads((validation / "report.json").read_text())["passed"] is False


def test_model_baseline_identical_weights_tie_everywhere(tmp_path, tiny_model_dir):
    # In process (main(argv)): a model-folder baseline is generated too; the same weights under another name must
    # tie on every problem, which also shows generation does not depend on which side or batch a prompt is in.
    import benchmark

    config, candidate = _validate_setup(tmp_path, tiny_model_dir, {"math": {"tie_min": 100, "n_min": 3}})
    code = benchmark.main(["--phase", str(config), "--baseline", str(tiny_model_dir), "--limit", "3",
                           "validate.tasks=[math]", "validate.batch_size=3"])
    assert code == 0
    report = json.loads((candidate / "validation" / "report.json").read_text())
    math = report["tasks"]["math"]
    assert math["n"] == 3 and math["pct"]["tie"] == 100.0 and math["mcnemar_p"] == 1.0
    assert math["generation"]["baseline"]["prompts"] == 3 and not report["baseline_stored"]
    samples = [json.loads(line) for line in (candidate / "validation" / "samples.jsonl").read_text().splitlines()]
    assert all(s["candidate"]["output"] == s["baseline"]["output"] for s in samples)
    assert (candidate / VALIDATED_STAMP).exists()
    with pytest.raises(UserError, match="the baseline is the candidate itself"):
        benchmark.main(["--phase", str(config), "--baseline", str(candidate)])


# A full disk while validation writes its reports: exit 3 with the disk message, nothing half-written under a final
# name, and a rerun with space finishes (ISSUES_LOG B85). Real tmpfs, filled deterministically.
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_exit_3_and_rerun_finishes(small_disk):
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill to the last byte: the first report write hits ENOSPC
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    report = _report(passed=True)
    samples = [{"task": "math", "id": str(i), "outcome": "win"} for i in range(100)]
    out = small_disk / "validation"
    with pytest.raises(ReportDiskStop) as caught:
        write_reports(out, report, samples)
    assert caught.value.exit_code == EXIT_DISK_STOP
    assert "disk filled" in caught.value.render()
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert not out.exists() or not list(out.iterdir())  # no temporary file left either
    os.unlink(filler)
    paths = write_reports(out, report, samples)
    assert all(paths[name].exists() for name in REPORT_FILES)
