"""Validate a phase: MATH and CODE win/tie/loss of its merged model against a baseline, gated.

    make validate PHASE=1a
    make validate PHASE=1a ARGS="--limit 20"                  # a quick look (n_min gates, if set, fail it)
    make validate PHASE=1b ARGS="--baseline checkpoints/phase1a_merged/validation/samples.jsonl"
    python scripts/benchmark.py --phase 1a validate.max_new_tokens=1024 validate.batch_size=32

Flow: config -> problems -> generate (candidate, then the baseline unless stored samples) -> judge -> pair ->
gates -> reports in <candidate>/validation/. Exit 0 and the VALIDATED stamp only when every gate passes;
otherwise exit 1 and any earlier stamp is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

# The code judge forks worker processes after the tokenizer ran; tokenizers' threads cannot survive a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from dataclasses import dataclass
from pathlib import Path

from cogumi.config import PhaseConfig, load_config, phase_config_path, resolve_path
from cogumi.errors import EXIT_FAILED, EXIT_OK, UserError, run_main
from cogumi.fsutil import atomic_write_json
from cogumi.generate import generate, load_model, unload
from cogumi.guards import VALIDATED_STAMP
from cogumi.hub import check_room, download, local_folder
from cogumi.manifest import read_manifest, weights_fingerprint
from cogumi.pairing import check_gates, describe_gate, evaluate_gates, outcome, summarize, unreachable
from cogumi.report import baseline_outputs, read_baseline_samples, write_reports

log = logging.getLogger("benchmark")

DEFAULT_SOURCES = {"math": "math500", "code": "humaneval"}
# Code judging is one sandboxed process per program: use half the cores, leaving the rest to the sandboxes' setup.
JUDGE_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class Plan:
    """Everything resolved from config + command line before any work starts."""

    phase: str
    candidate: Path
    baseline: str  # a model folder, a hub id, or a samples.jsonl path
    baseline_stored: bool
    tasks: list
    sources: dict  # task -> {"source": .., "subset": ..}
    gates: dict
    limit: int | None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", required=True, help="1a, 1b, demo, or a path to a phase YAML")
    parser.add_argument("--candidate", help="model folder to validate (default: the phase's merged model)")
    parser.add_argument("--baseline", help="model folder, hub id or samples.jsonl "
                                           "(default: validate.baseline, else the phase's base_model)")
    parser.add_argument("--limit", type=int, help="first N problems per task after the seeded shuffle")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. validate.limit=20")
    return parser.parse_args(argv)


def build_plan(config: PhaseConfig, args, source: str) -> Plan:
    """Resolve candidate, baseline, data and gates; every user mistake surfaces here, before any model loads."""
    v = config.validate
    candidate = resolve_path(args.candidate) if args.candidate else config.merged_dir
    if not candidate.is_dir():
        raise UserError(f"candidate model folder not found: {candidate}", where=str(candidate),
                        fix=f"run `make merge PHASE={args.phase}` first, or pass --candidate DIR")
    baseline = args.baseline or v.baseline or config.base_model
    stored = baseline.endswith(".jsonl")
    local = resolve_path(baseline) if stored else local_folder(baseline)
    if local is not None:
        baseline = str(local)  # otherwise a hub id, fetched by build_baseline_model
        if not local.exists():
            raise UserError(f"baseline not found: {local}", where="--baseline / validate.baseline",
                            fix="give a model folder, a hub id, or a samples.jsonl from an earlier `make validate`")
    if Path(baseline) == candidate:
        raise UserError("the baseline is the candidate itself", where="--baseline / validate.baseline",
                        fix="compare against the phase's base model or an earlier phase's merged model")
    gates = check_gates(v.gates, list(v.tasks), source=f"{source}: validate.gates")
    if not gates:
        log.warning("%s has no validate.gates: reports only, and no %s stamp", source, VALIDATED_STAMP)
    limit = args.limit if args.limit is not None else v.limit
    for key, value in (("limit", limit), ("max_new_tokens", v.max_new_tokens), ("batch_size", v.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"validate.{key} must be at least 1, got {value}", where=f"{source}: validate.{key}",
                            fix=f"e.g. validate.{key}=" + {"limit": "20", "max_new_tokens": "512"}.get(key, "8"))
    sources = {task: _task_source(task, v.data.get(task, DEFAULT_SOURCES[task]), source) for task in v.tasks}
    unknown = set(v.data) - set(v.tasks)
    if unknown:
        log.warning("validate.data names tasks that are not run: %s", ", ".join(sorted(unknown)))
    return Plan(config.name, candidate, baseline, stored, list(v.tasks), sources, gates, limit)


def _task_source(task: str, spec, source: str) -> dict:
    """validate.data.<task>: a source name or JSONL path, or {source: math500, subset: "level=4|5"}."""
    if isinstance(spec, str):
        return {"source": spec, "subset": None}
    if (isinstance(spec, dict) and isinstance(spec.get("source"), str) and set(spec) <= {"source", "subset"}
            and isinstance(spec.get("subset"), str | None)):
        return {"source": spec["source"], "subset": spec.get("subset")}
    raise UserError(f"validate.data.{task} must be a source name, a JSONL path or {{source, subset}}",
                    where=f"{source}: validate.data.{task}", fix=f"e.g. data: {{{task}: {DEFAULT_SOURCES[task]}}}")


def build_problems(plan: Plan, seed: int) -> dict:
    from cogumi.evaldata import load_task

    problems = {}
    for task in plan.tasks:
        spec = plan.sources[task]
        src = str(resolve_path(spec["source"])) if spec["source"].endswith(".jsonl") else spec["source"]
        problems[task] = load_task(src, limit=plan.limit, seed=seed, subset=spec["subset"])
        if not problems[task]:
            raise UserError(f"no {task} problems loaded from {spec['source']}", where=f"validate.data.{task}",
                            fix="check the source and subset")
        log.info("%s: %d problems from %s", task, len(problems[task]), spec["source"])
    return problems


def build_baseline(plan: Plan, problems: dict) -> tuple[str | None, dict | None]:
    """(model folder, None) to generate with, or (None, {task: outputs}) from stored samples.

    Both fail here, before minutes of candidate generation: a hub baseline is fetched (access and free space
    checked), stored samples must hold exactly today's problems and prompts.
    """
    if plan.baseline_stored:
        stored = read_baseline_samples(Path(plan.baseline))
        return None, {t: baseline_outputs(stored, t, problems[t], Path(plan.baseline)) for t in plan.tasks}
    if local_folder(plan.baseline) is not None:
        return plan.baseline, None
    check_room(plan.baseline)
    return str(download(plan.baseline)), None


def run_generation(model_name, problems: dict, config: PhaseConfig, side: str) -> tuple[dict, dict]:
    """({task: [output]}, {task: stats}) for one model; the model is freed before returning."""
    v = config.validate
    loaded = load_model(model_name)
    outputs, stats = {}, {}
    try:
        for task, items in problems.items():
            gen = generate(loaded, [p.prompt for p in items], max_new_tokens=v.max_new_tokens,
                           batch_size=v.batch_size, desc=f"{side} {task}")
            outputs[task], stats[task] = gen.texts, gen.stats()
            log.info("%s %s: %d tokens in %.1f s (%.1f tokens/s)", side, task, gen.new_tokens, gen.wall_s,
                     gen.tokens_per_s)
    finally:
        unload(loaded)
    return outputs, stats


def judge(task: str, problems: list, outputs: list[str]) -> list:
    if task == "math":
        from cogumi.judge_math import judge_math

        return [judge_math(out, p.answer) for p, out in zip(problems, outputs, strict=True)]
    from cogumi.sandbox import judge_many

    return list(judge_many(list(zip(outputs, problems, strict=True)), workers=JUDGE_WORKERS))


def pair_task(task: str, problems: list, cand_out: list[str], base_out: list[str]) -> tuple[dict, list[dict]]:
    """Judge both sides, then one outcome per problem: the task summary and its sample rows."""
    cand_v, base_v = judge(task, problems, cand_out), judge(task, problems, base_out)
    rows = []
    for p, co, bo, cv, bv in zip(problems, cand_out, base_out, cand_v, base_v, strict=True):
        rows.append({"task": task, "id": p.id, "prompt": p.prompt, "outcome": outcome(cv.passed, bv.passed),
                     "candidate": _side(co, cv), "baseline": _side(bo, bv)})
    return summarize([r["outcome"] for r in rows]), rows


def _side(output: str, verdict) -> dict:
    return {"output": output, "passed": verdict.passed, "reason": verdict.reason, "extracted": verdict.extracted}


def remove_stamp(candidate: Path) -> None:
    stamp = candidate / VALIDATED_STAMP
    if stamp.exists():
        stamp.unlink()
        log.info("removed the earlier %s stamp; it comes back only if every gate passes", VALIDATED_STAMP)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = phase_config_path(args.phase)
    config = load_config(config_path, args.overrides)
    plan = build_plan(config, args, str(config_path))
    v = config.validate
    log.info("candidate %s vs baseline %s%s; tasks %s; limit %s; max_new_tokens %d; batch %d", plan.candidate,
             plan.baseline, " (stored samples)" if plan.baseline_stored else "", plan.tasks, plan.limit,
             v.max_new_tokens, v.batch_size)
    _warn_base_mismatch(plan, config)
    # Data first: a bad source or stored baseline fails in seconds, before minutes of model loading.
    problems = build_problems(plan, v.seed)
    baseline_model, base_out = build_baseline(plan, problems)
    # From here the old verdict no longer describes this run, even if it is interrupted.
    remove_stamp(plan.candidate)
    cand_out, cand_stats = run_generation(plan.candidate, problems, config, "candidate")
    base_stats = {}
    if base_out is None:
        base_out, base_stats = run_generation(baseline_model, problems, config, "baseline")
    summaries, samples = {}, []
    for task in plan.tasks:
        summaries[task], rows = pair_task(task, problems[task], cand_out[task], base_out[task])
        summaries[task].update(source=plan.sources[task]["source"],
                               generation={"candidate": cand_stats[task], "baseline": base_stats.get(task)})
        samples += rows
    gate_results = evaluate_gates(summaries, plan.gates)
    report = build_report(plan, config, summaries, gate_results)
    paths = write_reports(plan.candidate / "validation", report, samples)
    print(one_screen(report, gate_results, paths["report.md"]))
    if not report["passed"]:
        return EXIT_FAILED
    write_stamp(plan, report, paths["report.json"])
    return EXIT_OK


def build_report(plan: Plan, config: PhaseConfig, summaries: dict, gate_results: list) -> dict:
    v = config.validate
    return {
        "phase": plan.phase, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # No gates: nothing vouches for the model.
        "passed": bool(gate_results) and all(g.passed for g in gate_results),
        "candidate": str(plan.candidate), "baseline": plan.baseline, "baseline_stored": plan.baseline_stored,
        "limit": plan.limit, "seed": v.seed, "max_new_tokens": v.max_new_tokens, "batch_size": v.batch_size,
        "tasks": summaries, "gates": [g._asdict() for g in gate_results],
    }


def write_stamp(plan: Plan, report: dict, report_json: Path) -> None:
    """VALIDATED: what passed, against what, and a fingerprint of the weights it vouches for."""
    atomic_write_json(plan.candidate / VALIDATED_STAMP, {
        "time": report["created"], "report": str(report_json), "baseline": plan.baseline,
        "n": {t: s["n"] for t, s in report["tasks"].items()}, "gates": report["gates"],
        "weights_fingerprint": weights_fingerprint(plan.candidate),
    })


def _warn_base_mismatch(plan: Plan, config: PhaseConfig) -> None:
    manifest = read_manifest(plan.candidate) or {}
    base = manifest.get("base_model")
    if base and base not in (config.base_model, str(resolve_path(config.base_model))):
        log.warning("the candidate was merged onto %s, but this phase's base_model is %s: is this the right "
                    "candidate for the baseline?", base, config.base_model)


def one_screen(report: dict, gate_results, report_md: Path) -> str:
    lines = [f"Validation of {report['candidate']} against {report['baseline']}:"]
    for task, s in report["tasks"].items():
        pct = s["pct"]
        lines.append(f"  {task:<4} n={s['n']:<4} win {pct['win']:5.1f} %  tie {pct['tie']:5.1f} % "
                     f"(right {pct['tie_right']:.1f}, wrong {pct['tie_wrong']:.1f})  loss {pct['loss']:5.1f} %  "
                     f"McNemar p={s['mcnemar_p']:.3g}")
    failing = [g for g in gate_results if not g.passed]
    if not gate_results:
        lines.append(f"No gates configured (validate.gates): no {VALIDATED_STAMP} stamp. Details: {report_md}")
    elif failing:
        lines.append(f"FAILED: {len(failing)} of {len(gate_results)} gates:")
        for g in failing:
            note = unreachable(g, report["tasks"].get(g.task))
            lines.append(f"  {describe_gate(g)}" + (f" ({note})" if note else ""))
        lines.append(f"No {VALIDATED_STAMP} stamp. Details: {report_md}")
    else:
        lines.append(f"PASSED: all {len(gate_results)} gates. Stamped {VALIDATED_STAMP}. Details: {report_md}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
