"""A rehearsal of a phase: every step for a few minutes with the real base and data, then the run card.

Train a few dozen steps in a hidden folder beside the real runs (`<output_root>/.rehearse-<name>-<pid>/`), stopped
with Ctrl-C after its first checkpoint and started again with the same command (the automatic resume), merge with
verification, validate a few problems per task; then predict the whole phase from what was measured: training
from the data's tokens and the measured real tokens/s, the merge as measured (same base, same size), validation
from the rehearsal answers' mean length and the decode rate of one short batch at the size the full run decodes
at (a few problems decode at a batch of a few rows, many times slower per token: ISSUES_LOG B44), plus loading and
judging as measured. The folder is removed at the end, whatever happened; the phase's own run
folder is never touched. Each step runs the real entry script in its own process, as `make` would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogumi.core.config import PhaseConfig, resolve_path
from cogumi.core.errors import UserError
from cogumi.core.fsutil import dir_size
from cogumi.core.paths import REPO_ROOT
from cogumi.merge.output_dir import human_bytes

SCRIPTS = REPO_ROOT / "scripts"
TRAIN, MERGE, VALIDATE = "train_phase1a_fullprecision.py", "merge_adapter_fullprecision.py", "benchmark.py"


@dataclass
class Measured:
    seconds: dict = field(default_factory=dict)  # step -> wall seconds of its processes
    train_tokens_per_s: float = 0.0
    checkpoint_bytes: int = 0
    merged_bytes: int = 0
    validation: dict = field(default_factory=dict)  # task -> {"prompts", "generation_s", "new_tokens", "sides"}
    decode: dict = field(default_factory=dict)  # task -> generate.decode_rate at the full run's batch size
    eval_rows: list = field(default_factory=list)  # train_log.jsonl's eval_loss rows


def rehearsal_root(config: PhaseConfig) -> Path:
    return resolve_path(config.output_root) / f".rehearse-{config.name}-{os.getpid()}"


def overrides_for(root: Path, steps: int, problems: int) -> list[str]:
    """The rehearsal's own folder and sizes: a checkpoint half-way, so the interrupted run leaves one to resume."""
    return [f"output_root={root}", f"train.max_steps={steps}", f"checkpoints.save_steps={max(1, steps // 2)}",
            f"validate.limit={problems}"]


def run_step(label: str, script: str, args: list[str], measured: Measured, ok=(0,)) -> None:
    """One entry script in its own process, its output shown as it runs; any exit code not in `ok` stops here."""
    print(f"\n[rehearse] ===== {label}: {script} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env={**os.environ, "FORCE": "1"})
    measured.seconds[label] = measured.seconds.get(label, 0.0) + time.perf_counter() - started
    if result.returncode not in ok:
        raise UserError(f"the rehearsal's {label} step failed (exit {result.returncode}); its message is above",
                        where=script, fix="fix that before the real run: that is what the rehearsal is for")


def train_interrupted_then_resumed(args: list[str], run_dir: Path, measured: Measured) -> None:
    """Start training, Ctrl-C it once its first checkpoint is complete, then run the same command again."""
    print(f"\n[rehearse] ===== train (stopped after its first checkpoint): {TRAIN} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(SCRIPTS / TRAIN), *args])
    while child.poll() is None and not any((p / "COMPLETE").exists() for p in run_dir.glob("checkpoint-*")):
        time.sleep(0.2)
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
    code = child.wait()
    measured.seconds["train"] = time.perf_counter() - started
    if code not in (0, 130):
        raise UserError(f"the rehearsal's first training run failed (exit {code}); its message is above",
                        where=TRAIN, fix="fix that before the real run: that is what the rehearsal is for")
    run_step("train", TRAIN, args, measured)  # resumes from the checkpoint, then exports the adapter


def measure(config: PhaseConfig, measured: Measured) -> None:
    from cogumi.train.trainlog import TRAIN_LOG, read_log

    logged = read_log(config.run_dir / TRAIN_LOG)
    rows = [r["tokens_per_s"] for r in logged if r.get("tokens_per_s")]
    measured.eval_rows = [r for r in logged if "eval_loss" in r]
    # the first window holds the warm-up (allocator, kernels); later ones are the steady state
    measured.train_tokens_per_s = statistics.median(rows[1:] or rows) if rows else 0.0
    checkpoints = [p for p in config.run_dir.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    measured.checkpoint_bytes = max((dir_size(p) for p in checkpoints), default=0)
    measured.merged_bytes = dir_size(config.merged_dir)
    report = json.loads((config.validation_dir / "report.json").read_text())
    for task, row in report["tasks"].items():
        sides = [s for s in (row.get("generation") or {}).values() if s]
        measured.validation[task] = {"prompts": row["n"], "generation_s": sum(s["wall_s"] for s in sides),
                                     "tokens_per_s": [s["tokens_per_s"] for s in sides],
                                     "new_tokens": sum(s["new_tokens"] for s in sides), "sides": len(sides)}


def probe_decoding(real: PhaseConfig, prompts: dict, merged_dir: Path, measured: Measured) -> None:
    """One short batch per task at the batch size the full validation will decode its prompts at, with the
    rehearsal's merged model (the same architecture and size as the real one)."""
    from cogumi.evaluate.generate import decode_rate, load_model, unload

    print("\n[rehearse] ===== decode rate at the full run's batch size", flush=True)
    started = time.perf_counter()
    loaded = load_model(merged_dir)
    try:
        for task, texts in prompts.items():
            measured.decode[task] = decode_rate(loaded, texts, max_new_tokens=real.validate.max_new_tokens,
                                                batch_size=real.validate.batch_size)
            print(f"[rehearse] {task}: {measured.decode[task]}", flush=True)
    finally:
        unload(loaded)
        measured.seconds["decode_probe"] = time.perf_counter() - started


@dataclass
class Card:
    lines: list[str]
    predicted: dict


def predict(real: PhaseConfig, measured: Measured, rows: int, tokens: int, rehearsal_steps: int,
            full_problems: dict, base_bytes: int) -> Card:
    """The whole phase from what the rehearsal measured. `rows` and `tokens`: the training items (examples, or
    packed rows) and real tokens the trainer will count for the real run, so steps and tokens match its own plan."""
    from cogumi.train.trainer import effective_batch, make_plan

    plan = make_plan(real, rows, tokens)
    tokens_per_step = effective_batch(real) * tokens / rows
    train_tokens = plan.total_steps * tokens_per_step
    tps = measured.train_tokens_per_s
    # each training process pays a fixed cost the steps do not show (imports, loading the base, the memory probe,
    # the adapter export): the rehearsal's two runs (stopped, then resumed) measure it
    fixed_s = max(0.0, (measured.seconds["train"] - rehearsal_steps * tokens_per_step / tps) / 2) if tps else 0.0
    train_s = train_tokens / tps + fixed_s if tps else float("nan")
    merge_s = measured.seconds.get("merge", 0.0)  # the same base, the same size: the whole process as measured
    # per task: answers x their mean length (as the rehearsal's answers ran, never past max_new_tokens) at the
    # decode rate of the full run's batch size; the rehearsal's own tokens/s (a batch of a few rows) is not used
    answer_tokens = {t: min(v["new_tokens"] / max(1, v["prompts"] * v["sides"]), real.validate.max_new_tokens)
                     for t, v in measured.validation.items()}
    generation_s = sum(v["sides"] * full_problems[t] * answer_tokens[t] / measured.decode[t]["tokens_per_s"]
                       for t, v in measured.validation.items())
    # loading the models and judging the answers, as measured: the rehearsal's validate step less its decoding
    overhead_s = measured.seconds["validate"] - sum(v["generation_s"] for v in measured.validation.values())
    validate_s = generation_s + max(0.0, overhead_s)
    eval_s, eval_line = _held_out(real, plan.total_steps, measured.eval_rows)
    total_s = train_s + eval_s + merge_s + validate_s
    peak_disk = base_bytes + (real.checkpoints.keep_last + 1) * measured.checkpoint_bytes + measured.merged_bytes
    predicted = {"train_s": round(train_s, 1), "train_fixed_s": round(fixed_s, 1), "merge_s": round(merge_s, 1),
                 "validate_s": round(validate_s, 1), "eval_s": round(eval_s, 1), "total_s": round(total_s, 1),
                 "gpu_hours": round(total_s / 3600, 3), "peak_disk_bytes": peak_disk,
                 "train_steps": plan.total_steps, "train_tokens": round(train_tokens),
                 "train_tokens_per_s": round(tps, 1), "problems": full_problems,
                 "validate_generation_s": round(generation_s, 1), "validate_overhead_s": round(max(0.0, overhead_s), 1),
                 "validate_answer_tokens": {t: round(n, 1) for t, n in answer_tokens.items()},
                 "validate_decode": {t: {"batch": d["batch"], "tokens_per_s": d["tokens_per_s"]}
                                     for t, d in measured.decode.items()}}
    sides = max((v["sides"] for v in measured.validation.values()), default=0)
    rates = ", ".join(f"{t} {answer_tokens[t]:.0f} tokens/answer at {d['tokens_per_s']:,.0f} tokens/s (batch "
                      f"{d['batch']})" for t, d in measured.decode.items())
    lines = [
        f"== run card: {real.name} (predicted from this rehearsal on this machine) ==",
        f"  train     {_hours(train_s)}  {plan.total_steps} steps, {train_tokens / 1e6:.1f} M tokens at "
        f"{tps:,.0f} tokens/s (measured), + {fixed_s:.0f} s to start and finish",
        eval_line,
        f"  merge     {_hours(merge_s)}  as measured, with verification",
        f"  validate  {_hours(validate_s)}  {sum(full_problems.values())} problems x {sides} models: {rates}, "
        f"measured at the full run's batch size; + {max(0.0, overhead_s):.0f} s loading and judging as measured",
        f"  total     {_hours(total_s)}  = {total_s / 3600:.2f} GPU-hours on one GPU",
        f"  peak disk {human_bytes(peak_disk)}  (base {human_bytes(base_bytes)} + {real.checkpoints.keep_last + 1} "
        f"checkpoints x {human_bytes(measured.checkpoint_bytes)} + merged {human_bytes(measured.merged_bytes)})",
        f"  rehearsal {sum(measured.seconds.values()):.0f} s: " +
        ", ".join(f"{k} {v:.0f} s" for k, v in measured.seconds.items()),
    ]
    return Card(lines, predicted)


def _held_out(real: PhaseConfig, total_steps: int, rows: list[dict]) -> tuple[float, str]:
    """(seconds, card line) of the real run's evaluations: their count times the rehearsal's measured seconds."""
    if not rows:
        return 0.0, "  eval      none       no held-out set (data.eval_fraction 0, no data.eval_path): no eval_loss"
    every = real.train.eval_every or real.checkpoints.save_steps
    evals = total_steps // every + (total_steps % every != 0)
    per_eval = statistics.median(r["eval_s"] for r in rows)
    last = rows[-1]
    return evals * per_eval, (f"  eval      {_hours(evals * per_eval)}  {evals} evals (every {every} steps) x "
                              f"{per_eval:.1f} s of {last['eval_tokens']:,} held-out tokens; the rehearsal's "
                              f"eval_loss {last['eval_loss']:.4f} at step {last['step']}")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:6.2f} h" if seconds >= 3600 else f"{seconds / 60:6.1f} min"


def data_shape(real: PhaseConfig) -> tuple[int, int]:
    """(training items, real tokens) exactly as the trainer counts them: examples, or packed rows when
    data.packing is on, encoded with the base's own tokenizer."""
    from transformers import AutoTokenizer

    from cogumi.core.hub import local_folder
    from cogumi.train.data import encode_data, read_data

    base = local_folder(real.base_model) or real.base_model
    encoded = encode_data(real.data, read_data(real.data), AutoTokenizer.from_pretrained(str(base)),
                          seed=real.train.seed)
    return len(encoded.items), encoded.stats.tokens


def full_problem_prompts(real: PhaseConfig, config_path: str, candidate: Path) -> dict:
    """Prompts per task of the real validation (no limit), resolved as `make validate` resolves them."""
    from argparse import Namespace

    from cogumi.evaluate import validate

    args = Namespace(candidate=str(candidate), baseline=None, limit=None, phase=real.name)
    plan = validate.build_plan(real, args, config_path)
    problems = validate.build_problems(plan, real.validate.seed)
    return {task: [p.prompt for p in items] for task, items in problems.items()}


def base_size(real: PhaseConfig) -> int:
    from cogumi.core.hub import local_folder

    folder = local_folder(real.base_model)
    return dir_size(folder) if folder is not None and folder.exists() else 0


def cleanup(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
        print(f"[rehearse] removed {root}", flush=True)
