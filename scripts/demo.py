"""make demo: the whole chain on a tiny Llama built here, on CPU, in a few minutes — no download.

    build (or reuse) the tiny base -> train (LoRA) -> merge (streaming, verified) -> validate (gated)

Each step runs the same entry script, with the same config machinery and gates, that `make train/merge/validate`
run for the real 8B phases (configs/demo.yaml). A second `make demo` reuses every complete step and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_OK, UserError, run_main
from cogumi.core.fsutil import aside_name, atomic_write_json
from cogumi.core.integrity import verify_weights
from cogumi.core.manifest import read_manifest, sha256_file
from cogumi.core.stamp import VALIDATED_STAMP, stamp_is_current
from cogumi.core.switches import switch
from cogumi.demo.tasks import corpus

log = logging.getLogger("demo")
SCRIPTS = Path(__file__).resolve().parent
# The tiny base: big enough to learn the demo's rules from 1200 rows in a few hundred CPU steps.
BASE_SPEC = {"vocab_size": 512, "hidden_size": 128, "layers": 4, "heads": 4, "kv_heads": 2,
             "intermediate_size": 256, "output_gain": 10.0, "seed": 0, "dtype": "bfloat16",
             "max_shard_size": "1MB", "data": "data/demo/train.jsonl"}
BASE_SPEC_FILE = "demo_base.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="put every demo output under this folder instead of checkpoints/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    return parser.parse_intermixed_args(argv)


def root_overrides(root: str | None) -> list[str]:
    if not root:
        return []
    base = str(Path(root) / "demo_base")
    return [f"output_root={root}", f"base_model={base}", f"validate.baseline={base}"]


def write_tiny_base(base_dir: Path, train_path: Path) -> None:
    """Build the tiny bf16 base once; a folder made from the same spec is reused."""
    import torch

    from cogumi.demo.tiny import save_tiny_model

    spec = {**BASE_SPEC, "data_sha256": sha256_file(train_path)}
    spec_file = base_dir / BASE_SPEC_FILE
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        print(f"[demo] base: reusing {base_dir}")
        return
    if base_dir.exists():
        raise SystemExit(f"[demo] {base_dir} exists but was not built from this demo spec; move it away first")
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tmp = aside_name(base_dir, "partial")
    save_tiny_model(tmp, corpus=corpus(rows), vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                    layers=spec["layers"], heads=spec["heads"], kv_heads=spec["kv_heads"],
                    intermediate_size=spec["intermediate_size"], output_gain=spec["output_gain"],
                    seed=spec["seed"], dtype=torch.bfloat16, max_shard_size=spec["max_shard_size"])
    atomic_write_json(tmp / BASE_SPEC_FILE, spec)
    os.replace(tmp, base_dir)
    print(f"[demo] base: built a tiny bf16 Llama in {base_dir}")


def run_step(label: str, script: str, args: list[str], **env: str) -> None:
    print(f"\n[demo] ===== {label}: {script} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env={**os.environ, **env}, check=False)
    print(f"[demo] ===== {label}: exit {result.returncode} after {time.perf_counter() - start:.0f}s", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"[demo] FAILED at '{label}' (exit {result.returncode}); its message is above.")


def demo_code_opt_in() -> dict[str, str]:
    """The demo's validation runs code written by the tiny model it just trained on shipped tasks. Where this machine
    cannot contain model code (no mount/network namespaces, e.g. a container without them), the real phases refuse
    to run it; the demo opts in, says so, and still runs it with the sandbox's other limits."""
    from cogumi.judge.sandbox import OPT_IN_ENV, isolation

    if os.environ.get(OPT_IN_ENV) == "1":
        return {}
    iso = isolation()
    if iso.contained:
        return {}
    print(f"[demo] this machine cannot contain model-written code ({iso.describe()}); the demo runs its tiny "
          f"model's code anyway ({OPT_IN_ENV}=1 for this step only). `make validate` of a real phase refuses "
          "instead.")
    return {OPT_IN_ENV: "1"}


def merge_is_current(config) -> bool:
    """The merged model exists, was made from the adapter now on disk, and its weights are whole and unchanged."""
    merged, adapter = read_manifest(config.merged_dir), config.adapter_dir / "adapter_model.safetensors"
    if not (merged and adapter.exists() and merged.get("adapter_hash") == sha256_file(adapter)
            and merged.get("weights_sha256")):  # no whole-file hashes: nothing vouches for the bytes, merge again
        return False
    try:  # a truncated or overwritten shard is merged again, never reused (ISSUES_LOG B22)
        verify_weights(config.merged_dir, merged.get("weights_sha256"), against="its manifest.json", fix="")
    except UserError as err:
        print(f"[demo] merge: {err.what}; merging again")
        return False
    return True


def validation_is_current(config) -> bool:
    """Stamped VALIDATED, and the weights are still the bytes the stamp vouches for."""
    manifest = config.merged_dir / "manifest.json"
    return manifest.exists() and stamp_is_current(config.merged_dir)


def summary(config) -> str:
    report = json.loads((config.validation_dir / "report.json").read_text())
    lines = ["", "[demo] done. Look at:",
             f"  loss curve      {config.run_dir / 'loss.png'} (training loss and the held-out eval_loss)",
             f"  merge report    {config.merged_dir / 'merge_report.json'}",
             f"  win/tie/loss    {config.validation_dir / 'wtl.png'}",
             f"  full report     {config.validation_dir / 'report.md'}"]
    for task in config.validate.tasks:
        row = report["tasks"][task]
        pct = row["pct"]
        lines.append(f"  {task:5s} wins {pct['win']:5.1f}%  ties {pct['tie']:5.1f}%  losses {pct['loss']:5.1f}%  "
                     f"McNemar p={row['mcnemar_p']:.2g}  (n={row['n']})")
    lines.append(f"  gates: {'all passed, VALIDATED' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_path = str(phase_config_path("demo"))
    overrides = root_overrides(args.root) + args.overrides
    config = load_config(config_path, overrides)
    step_args = ["--phase", config_path, *overrides]
    write_tiny_base(Path(config.base_model) if Path(config.base_model).is_absolute()
               else Path(config_path).parents[1] / config.base_model,
               Path(config_path).parents[1] / config.data.train_path)
    run_step("train", "train_phase1a_fullprecision.py", step_args)  # resumes or reports a finished run itself
    redo = switch("FORCE")
    if merge_is_current(config) and not redo:
        print(f"\n[demo] merge: {config.merged_dir} was made from this adapter; reusing it")
    else:
        # A merged folder from an older demo adapter is stale: FORCE=1 moves it aside (never deletes it).
        run_step("merge", "merge_adapter_fullprecision.py", step_args, FORCE="1")
    if validation_is_current(config) and not redo:
        print(f"[demo] validate: {config.merged_dir} already carries its {VALIDATED_STAMP} stamp; reusing it")
    else:
        run_step("validate", "benchmark.py", step_args, **demo_code_opt_in())
    print(summary(config))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
