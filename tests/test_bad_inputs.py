"""The bad-input table: every refusal is exit 2 (3 for disk), one message whose first lines name the key, file or
line, and not one file changed on disk (a tree listing of every file with its size and mtime, before and after).

Each case runs the real entry point through `run_main` in this process (the table would take minutes as 70
interpreter starts): the same main(), the same one-screen rendering, the same exit code. The workspace holds a
finished run with checkpoints, so a refusal that moved or rewrote anything of it would show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

# The entry scripts (benchmark, merge_adapter_fullprecision, train_phase1a_fullprecision) are imported plainly, not
# with importorskip: one that fails to import must fail this table, not skip it.
from benchmark import main as validate_main
from merge_adapter_fullprecision import main as merge_main
from safetensors.torch import load_file, save_file
from train_phase1a_fullprecision import main as train_main

from cogumi.core.errors import run_main
from cogumi.core.integrity import weights_sha256
from cogumi.core.manifest import write_manifest
from cogumi.core.stamp import write_stamp

SWITCH_ENV = ("FORCE", "RESUME", "ALLOW_UNVALIDATED", "RESUME_CHANGED", "PLAIN_BASE")


def _rows(n=12):
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _base_variant(good: Path, where: Path, *, config=None, tokenizer=None, drop=(), text=None) -> Path:
    shutil.copytree(good, where)
    for name in drop:
        (where / name).unlink()
    if config is not None:
        data = json.loads((where / "config.json").read_text())
        data.update(config)
        for key in [k for k, v in config.items() if v is None]:
            del data[key]
        (where / "config.json").write_text(json.dumps(data))
    if tokenizer is not None:
        data = json.loads((where / "tokenizer_config.json").read_text())
        data.update(tokenizer)
        (where / "tokenizer_config.json").write_text(json.dumps(data))
    if text is not None:
        (where / "config.json").write_text(text)
    return where


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir) -> Path:
    """Everything the table reads, made before the first listing: a base and its bad variants, data and its bad
    variants, a finished run (checkpoints, adapter, log, resolved config), merged outputs."""
    ws = tmp_path_factory.mktemp("bad_inputs")
    base = ws / "base"
    shutil.copytree(tiny_model_dir, base)
    tensors = load_file(base / "model.safetensors")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    data = ws / "data"
    data.mkdir()
    _jsonl(data / "good.jsonl", _rows())
    (data / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "ok"}\n')
    (data / "garbled.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n{not json\n")
    _jsonl(data / "not_object.jsonl", [_rows(1)[0], [1, 2]])
    _jsonl(data / "empty_answer.jsonl", _rows(3) + [{"prompt": "Say hi.", "response": "  "}])
    _jsonl(data / "robot.jsonl", [{"messages": [{"role": "user", "content": "x" * 300},
                                                {"role": "robot", "content": "y" * 300}]}])
    _jsonl(data / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    (data / "empty.jsonl").write_text("")

    bases = ws / "bases"
    bases.mkdir()
    (bases / "empty").mkdir()
    _base_variant(base, bases / "no_weights", drop=["model.safetensors"])
    _base_variant(base, bases / "bad_config", text='{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    _base_variant(base, bases / "quantized", config={"quantization_config": {"quant_method": "bitsandbytes"}})
    theta = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "rope_theta": None}
    _base_variant(base, bases / "tf5", config={"transformers_version": "5.0.0", **theta},
                  tokenizer={"tokenizer_class": "TokenizersBackend"})
    _base_variant(base, bases / "rope_parameters", config=theta)
    _base_variant(base, bases / "tokenizers_backend", tokenizer={"tokenizer_class": "TokenizersBackend"})
    _base_variant(base, bases / "tf5_version_only", config={"transformers_version": "5.2.0"})
    unvalidated = _base_variant(base, bases / "unvalidated_merged")
    write_manifest(unvalidated, "merged", base_model="tiny", weights_sha256=weights_sha256(unvalidated))
    changed = _base_variant(base, bases / "changed_merged")
    write_manifest(changed, "merged", base_model="tiny", weights_sha256=weights_sha256(changed))
    write_stamp(changed, {"gates": []}, weights_sha256=weights_sha256(changed))
    with open(changed / "model.safetensors", "r+b") as fh:  # after validation, 64 KiB mid-file
        fh.seek(fh.seek(0, 2) // 2)
        fh.write(b"\x11" * 65536)
    _chain_variants(base, bases)

    baselines = ws / "baselines"
    baselines.mkdir()
    (baselines / "garbled.jsonl").write_text('{"task": "math", "id": "m1", "output": "1"}\n{oops\n')
    _jsonl(baselines / "not_object.jsonl", [["math", "m1", "1"]])

    config = {"name": "tinyrun", "base_model": str(base), "output_root": str(ws / "out"),
              "data": {"train_path": str(data / "good.jsonl"), "max_seq_len": 64},
              "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "log_every": 1,
                        "lr_scheduler": "constant", "warmup_ratio": 0.0},
              "checkpoints": {"save_steps": 1, "keep_last": 2}, "disk": {"monitor": False, "margin_mb": 1},
              "validate": {"tasks": ["math"], "baseline": str(baselines / "garbled.jsonl"),
                           "gates": {"math": {"n_min": 1}}}}
    (ws / "run.yaml").write_text(yaml.safe_dump(config))
    for name in SWITCH_ENV:
        os.environ.pop(name, None)
    assert train_main(["--phase", str(ws / "run.yaml")]) == 0  # the finished run every case must leave alone
    candidate = shutil.copytree(base, ws / "out" / "tinyrun_merged")  # a stand-in merged output (validate's)
    write_manifest(candidate, "merged", base_model=str(base), weights_sha256=weights_sha256(candidate))
    _candidate_variants(candidate, ws / "candidates")
    _run_variants(ws / "out")
    return ws


def _merged(base: Path, where: Path, *, stamp: bool = False) -> Path:
    """A merged phase output as merge and validate leave it: weights, report, manifest with hashes, maybe a stamp."""
    folder = _base_variant(base, where)
    (folder / "merge_report.json").write_text(json.dumps({"passed": True}))
    write_manifest(folder, "merged", base_model="tiny", weights_sha256=weights_sha256(folder))
    if stamp:
        write_stamp(folder, {"gates": []}, weights_sha256=weights_sha256(folder))
    return folder


def _chain_variants(base: Path, bases: Path) -> None:
    """Each link of the chain of trust removed or corrupted (docs/TROUBLESHOOTING.md, "Chain of trust")."""
    (_merged(base, bases / "merged_no_manifest") / "manifest.json").unlink()  # shaped like a merge, no manifest
    (_merged(base, bases / "stamped_no_manifest", stamp=True) / "manifest.json").unlink()
    kind_base = _merged(base, bases / "merged_kind_base")
    manifest = json.loads((kind_base / "manifest.json").read_text())
    (kind_base / "manifest.json").write_text(json.dumps({**manifest, "kind": "base"}))
    (_merged(base, bases / "manifest_garbled") / "manifest.json").write_text('{"kind": "merged",\n  oops}')
    (_merged(base, bases / "manifest_a_list") / "manifest.json").write_text('["merged"]')
    (_merged(base, bases / "stamp_garbled", stamp=True) / "VALIDATED").write_text("validated, trust me\n")
    other = _merged(base, bases / "stamp_other_than_manifest", stamp=True)  # the manifest's hashes edited
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["weights_sha256"]["model.safetensors"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    no_hashes = _merged(base, bases / "stamp_without_hashes", stamp=True)
    (no_hashes / "VALIDATED").write_text(json.dumps({"gates": []}))


def _candidate_variants(good: Path, candidates: Path) -> None:
    """Validate's candidate without a manifest, without hashes, with a manifest that is not JSON, or not a merge."""
    candidates.mkdir()
    shutil.copytree(good, candidates / "no_manifest")
    (candidates / "no_manifest" / "manifest.json").unlink()
    for name, edit in (("no_hashes", lambda m: {k: v for k, v in m.items() if k != "weights_sha256"}),
                       ("empty_hashes", lambda m: {**m, "weights_sha256": {}}),
                       ("kind_adapter", lambda m: {**m, "kind": "adapter"})):
        folder = shutil.copytree(good, candidates / name)
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps(edit(manifest)))
    garbled = shutil.copytree(good, candidates / "garbled")
    (garbled / "manifest.json").write_text("{not json")


def _run_variants(out: Path) -> None:
    """Copies of the finished run: its newest checkpoint without adapter/ or trainer state, its adapter's manifest
    not JSON."""
    for name, remove in (("noadapter", "adapter"), ("nostate", "trainer_state.pt")):
        run = shutil.copytree(out / "tinyrun", out / name)
        path = run / "checkpoint-2" / remove
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run = shutil.copytree(out / "tinyrun", out / "garbledadapter")
    (run / "adapter" / "manifest.json").write_text("{\"kind\": \"adapter\",\n")


def listing(root: Path) -> dict:
    """Every file and folder under root: files with size and mtime; folders by name (the run lock comes and goes
    in out/, which changes only that folder's mtime)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


D = "data/"
B = "bases/"
# (id, script, arguments after --phase run.yaml (`@` is the workspace), environment, exit code, text the ERROR
# line must hold, text the ERROR or where line must hold (a key, file or file:line)).
CASES = [
    # values, checked at load
    ("lr-negative", "train", ["train.learning_rate=-1"], {}, 2, "train.learning_rate", "train.learning_rate"),
    ("lr-zero", "train", ["train.learning_rate=0"], {}, 2, "train.learning_rate", "train.learning_rate"),
    ("dropout-1.5", "train", ["lora.dropout=1.5"], {}, 2, "lora.dropout", "lora.dropout"),
    ("dropout-negative", "train", ["lora.dropout=-0.1"], {}, 2, "lora.dropout", "lora.dropout"),
    ("scheduler-bogus", "train", ["train.lr_scheduler=bogus"], {}, 2, "train.lr_scheduler", "train.lr_scheduler"),
    ("liger-maybe", "train", ["train.liger=maybe"], {}, 2, "train.liger", "train.liger"),
    ("dtype-float16", "train", ["train.dtype=float16"], {}, 2, "train.dtype", "train.dtype"),
    ("dtype-int4", "train", ["train.dtype=int4"], {}, 2, "train.dtype", "train.dtype"),
    ("attention-unknown", "train", ["train.attention=flash3"], {}, 2, "train.attention", "train.attention"),
    ("device-tpu", "train", ["train.device=tpu"], {}, 2, "train.device", "train.device"),
    ("warmup-5", "train", ["train.warmup_ratio=5"], {}, 2, "train.warmup_ratio", "train.warmup_ratio"),
    ("max-steps-0", "train", ["train.max_steps=0"], {}, 2, "train.max_steps", "train.max_steps"),
    ("max-steps-unclosed", "train", ["train.max_steps=[1"], {}, 2, "train.max_steps=[1", "train.max_steps"),
    ("max-steps-text", "train", ["train.max_steps=abc"], {}, 2, "train.max_steps", "run.yaml"),
    ("epochs-0", "train", ["train.max_steps=null", "train.epochs=0"], {}, 2, "train.epochs", "train.epochs"),
    ("max-seq-len-0", "train", ["data.max_seq_len=0"], {}, 2, "data.max_seq_len", "data.max_seq_len"),
    ("max-seq-len-8", "train", ["data.max_seq_len=8"], {}, 2, "data.max_seq_len", "data.max_seq_len"),
    ("name-escapes", "train", ["name=../escaped"], {}, 2, "'name'", "name"),
    ("name-dot", "train", ["name=."], {}, 2, "'name'", "name"),
    ("name-slash", "train", ["name=a/b"], {}, 2, "'name'", "name"),
    ("lora-r-0", "train", ["lora.r=0"], {}, 2, "lora.r", "run.yaml"),
    ("lora-alpha-0", "train", ["lora.alpha=0"], {}, 2, "lora.alpha", "lora.alpha"),
    ("targets-empty", "train", ["lora.target_modules=[]"], {}, 2, "lora.target_modules", "lora.target_modules"),
    ("targets-unknown", "train", ["lora.target_modules=[nope_proj]"], {}, 2, "nope_proj", "lora.target_modules"),
    ("micro-batch-0", "train", ["train.micro_batch_size=0"], {}, 2, "train.micro_batch_size", "run.yaml"),
    ("keep-last-0", "train", ["checkpoints.keep_last=0"], {}, 2, "checkpoints.keep_last", "run.yaml"),
    ("save-steps-0", "train", ["checkpoints.save_steps=0"], {}, 2, "checkpoints.save_steps", "run.yaml"),
    ("disk-thresholds", "train", ["disk.warn=95"], {}, 2, "warn <= alert", "run.yaml"),
    ("packing-maybe", "train", ["data.packing=maybe"], {}, 2, "data.packing", "data.packing"),
    ("checkpointing-maybe", "train", ["train.gradient_checkpointing=maybe"], {}, 2,
     "train.gradient_checkpointing", "train.gradient_checkpointing"),
    ("log-every-0", "train", ["train.log_every=0"], {}, 2, "train.log_every", "train.log_every"),
    ("weight-decay-negative", "train", ["train.weight_decay=-1"], {}, 2, "train.weight_decay", "train.weight_decay"),
    ("unknown-key", "train", ["train.learning_rat=1"], {}, 2, "train.learning_rat", "run.yaml"),
    ("override-not-key-value", "train", ["train.max_steps"], {}, 2, "train.max_steps", "command line"),
    ("section-not-mapping", "train", ["train=5"], {}, 2, "'train' must be a mapping", "run.yaml"),
    ("task-unknown", "train", ["validate.tasks=[bogus]"], {}, 2, "bogus", "tasks"),
    ("gate-unknown", "train", ["validate.gates.math.wins_min=5"], {}, 2, "wins_min", "validate.gates"),
    ("gate-out-of-range", "train", ["validate.gates.math.win_min=150"], {}, 2, "win_min", "validate.gates"),
    ("top1-agreement-2", "merge", ["merge.min_top1_agreement=2"], {}, 2, "merge.min_top1_agreement",
     "merge.min_top1_agreement"),
    ("verify-prompts-0", "merge", ["merge.verify_prompts=0"], {}, 2, "merge.verify_prompts", "merge.verify_prompts"),
    # switches
    ("force-maybe", "merge", [], {"FORCE": "maybe"}, 2, "'FORCE' is a switch", "environment"),
    ("resume-perhaps", "train", [], {"RESUME": "perhaps"}, 2, "'RESUME' is a switch", "environment"),
    ("allow-unvalidated-2", "train", [], {"ALLOW_UNVALIDATED": "2"}, 2, "ALLOW_UNVALIDATED", "environment"),
    # data
    ("data-missing", "train", [f"data.train_path=@{D}nope.jsonl"], {}, 2, "not found", "data.train_path"),
    ("data-latin1", "train", [f"data.train_path=@{D}latin1.jsonl"], {}, 2, "not UTF-8", "latin1.jsonl:1"),
    ("data-garbled", "train", [f"data.train_path=@{D}garbled.jsonl"], {}, 2, "not valid JSON", "garbled.jsonl:2"),
    ("data-not-object", "train", [f"data.train_path=@{D}not_object.jsonl"], {}, 2, "malformed row",
     "not_object.jsonl:2"),
    ("data-empty-answer", "train", [f"data.train_path=@{D}empty_answer.jsonl"], {}, 2, "empty content",
     "empty_answer.jsonl:4"),
    ("data-robot", "train", [f"data.train_path=@{D}robot.jsonl"], {}, 2, "role 'robot'", "robot.jsonl:1"),
    ("data-no-answer", "train", [f"data.train_path=@{D}no_answer.jsonl"], {}, 2, "no assistant", "no_answer.jsonl:1"),
    ("data-empty", "train", [f"data.train_path=@{D}empty.jsonl"], {}, 2, "no rows", "empty.jsonl"),
    # bases
    ("base-missing", "train", [f"base_model=@{B}nope"], {}, 2, "not found", "base_model"),
    ("base-empty-folder", "train", [f"base_model=@{B}empty"], {}, 2, "no config.json", "empty"),
    ("base-no-weights", "train", [f"base_model=@{B}no_weights"], {}, 2, "no *.safetensors", "no_weights"),
    ("base-bad-config", "train", [f"base_model=@{B}bad_config"], {}, 2, "config.json is not valid JSON",
     "bad_config/config.json:2"),
    ("base-quantized", "train", [f"base_model=@{B}quantized"], {"ALLOW_UNVALIDATED": "1"}, 2, "quantiz",
     "quantized"),
    ("base-transformers-5", "train", [f"base_model=@{B}tf5"], {}, 2, "newer transformers format",
     "tf5/config.json"),
    ("base-rope-parameters", "train", [f"base_model=@{B}rope_parameters"], {}, 2, "rope_theta 10000",
     "rope_parameters/config.json"),
    ("base-tokenizers-backend", "train", [f"base_model=@{B}tokenizers_backend"], {}, 2, "TokenizersBackend",
     "tokenizers_backend/config.json"),
    ("base-written-by-5.2", "train", [f"base_model=@{B}tf5_version_only"], {}, 2, "transformers 5.2.0",
     "tf5_version_only/config.json"),
    ("base-unvalidated", "train", [f"base_model=@{B}unvalidated_merged"], {"FORCE": "1"}, 2, "VALIDATED",
     "unvalidated_merged"),
    ("base-changed-since-validated", "train", [f"base_model=@{B}changed_merged"], {"ALLOW_UNVALIDATED": "1"}, 2,
     "changed since it was validated", "changed_merged"),
    # the chain of trust, each link removed or corrupted (ISSUES_LOG B47-B49)
    ("base-merged-no-manifest", "train", [f"base_model=@{B}merged_no_manifest"], {"ALLOW_UNVALIDATED": "1"}, 2,
     "no manifest.json", "merged_no_manifest/manifest.json"),
    ("base-stamped-no-manifest", "train", [f"base_model=@{B}stamped_no_manifest"], {}, 2, "no manifest.json",
     "stamped_no_manifest/manifest.json"),
    ("base-kind-edited", "train", [f"base_model=@{B}merged_kind_base"], {}, 2, "kind 'base'",
     "merged_kind_base/manifest.json"),
    ("base-manifest-garbled", "train", [f"base_model=@{B}manifest_garbled"], {"PLAIN_BASE": "1"}, 2,
     "manifest.json is not valid JSON", "manifest_garbled/manifest.json:2"),
    ("base-manifest-a-list", "train", [f"base_model=@{B}manifest_a_list"], {}, 2, "not an object",
     "manifest_a_list/manifest.json"),
    ("base-stamp-garbled", "train", [f"base_model=@{B}stamp_garbled"], {}, 2, "VALIDATED is not valid JSON",
     "stamp_garbled/VALIDATED"),
    ("base-stamp-other-than-manifest", "train", [f"base_model=@{B}stamp_other_than_manifest"], {}, 2,
     "other weights than its manifest.json", "stamp_other_than_manifest/VALIDATED"),
    ("base-stamp-without-hashes", "train", [f"base_model=@{B}stamp_without_hashes"], {"ALLOW_UNVALIDATED": "1"}, 2,
     "no whole-file weight hashes", "stamp_without_hashes/VALIDATED"),
    ("candidate-no-manifest", "validate", ["--candidate", "@candidates/no_manifest"], {}, 2, "no manifest.json",
     "no_manifest/manifest.json"),
    ("candidate-no-hashes", "validate", ["--candidate", "@candidates/no_hashes"], {}, 2,
     "no whole-file weight hashes", "no_hashes/manifest.json"),
    ("candidate-empty-hashes", "validate", ["--candidate", "@candidates/empty_hashes"], {}, 2,
     "no whole-file weight hashes", "empty_hashes/manifest.json"),
    ("candidate-kind-adapter", "validate", ["--candidate", "@candidates/kind_adapter"], {}, 2, "kind 'adapter'",
     "kind_adapter/manifest.json"),
    ("candidate-manifest-garbled", "validate", ["--candidate", "@candidates/garbled"], {}, 2, "not valid JSON",
     "garbled/manifest.json:1"),
    ("checkpoint-complete-no-adapter", "train", ["name=noadapter"], {}, 2, "marked COMPLETE but has no adapter/",
     "noadapter/checkpoint-2/adapter/adapter_model.safetensors"),
    ("checkpoint-complete-no-state", "train", ["name=nostate"], {}, 2, "marked COMPLETE but has no trainer_state",
     "nostate/checkpoint-2/trainer_state.pt"),
    ("merge-adapter-manifest-garbled", "merge", ["name=garbledadapter"], {}, 2, "manifest.json is not valid JSON",
     "garbledadapter/adapter/manifest.json:2"),
    # the finished run in out/tinyrun
    ("resume-changed-settings", "train", ["train.learning_rate=1e-3"], {}, 2, "train.learning_rate: 0.0002 -> 0.001",
     "checkpoint-2"),
    ("resume-0-then-refused", "train", ["train.learning_rate=1e-3", f"data.train_path=@{D}robot.jsonl"],
     {"RESUME": "0"}, 2, "role 'robot'", "robot.jsonl:1"),
    ("resume-0-then-bad-targets", "train", ["lora.target_modules=[nope_proj]"], {"RESUME": "0"}, 2, "nope_proj",
     "lora.target_modules"),
    # validate and merge
    ("baseline-garbled", "validate", [], {}, 2, "not valid JSON", "garbled.jsonl:2"),
    ("baseline-not-object", "validate", ["validate.baseline=@baselines/not_object.jsonl"], {}, 2,
     "not an object", "not_object.jsonl:1"),
    ("candidate-missing", "validate", ["name=nothing"], {}, 2, "candidate model folder not found", "nothing_merged"),
    ("merge-no-adapter", "merge", ["name=nothing"], {}, 2, "adapter", "nothing"),
]
MAINS = {"train": lambda: train_main, "merge": lambda: merge_main, "validate": lambda: validate_main}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly_and_changes_nothing(ws, case, monkeypatch, capsys):
    name, script, overrides, env, code, in_error, in_where = case
    for key in SWITCH_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--phase", str(ws / "run.yaml"), *(o.replace("@", f"{ws}/") for o in overrides)]
    if script == "merge":
        argv.append("--no-verify")
    before = listing(ws)
    capsys.readouterr()
    term = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as ended:
            run_main(MAINS[script](), argv)
    finally:
        signal.signal(signal.SIGTERM, term)
    err = capsys.readouterr().err
    assert ended.value.code == code, err[-3000:]
    assert "Traceback" not in err
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("ERROR: "))
    assert in_error in lines[first], lines[first]
    where = lines[first + 1] if first + 1 < len(lines) and lines[first + 1].startswith("  where:") else ""
    assert in_where in lines[first] + where, (lines[first], where)
    assert listing(ws) == before, f"{name} changed files on disk"


def test_the_table_covers_the_issue():
    assert len(CASES) >= 82 and len({c[0] for c in CASES}) == len(CASES)


def test_ctrl_c_while_the_libraries_load_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C during `import torch` (before run_main can catch it): one line, exit 130, no traceback."""
    import subprocess
    import sys
    import time

    from cogumi.core.paths import SCRIPTS_DIR

    proc = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / "train_phase1a_fullprecision.py"), "--phase", "demo"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    maps = Path(f"/proc/{proc.pid}/maps")
    # torch's extension is mapped while `import torch` runs: the script is past `import cogumi`, not yet in main().
    while time.monotonic() < deadline and proc.poll() is None and "torch" not in maps.read_text(errors="replace"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "Interrupted while starting" in err, err
