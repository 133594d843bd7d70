"""Validation's steps, in the order `benchmark.py` runs them: plan, problems, baseline, generation, judging and
pairing per task (through the task registry), report, stamp.

Every user mistake surfaces in build_plan / build_problems / build_baseline, before any model loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cogumi.core.config import PhaseConfig, resolve_path
from cogumi.core.errors import UserError
from cogumi.core.hub import check_room, download, local_folder
from cogumi.core.integrity import verify_weights
from cogumi.core.manifest import MANIFEST, read_manifest
from cogumi.core.stamp import VALIDATED_STAMP, write_stamp
from cogumi.evaluate.generate import generate, load_model, unload
from cogumi.evaluate.pairing import check_gates, describe_gate, outcome, summarize, unreachable
from cogumi.evaluate.report import baseline_outputs, check_reference, describe_reference, read_baseline_samples
from cogumi.evaluate.sources import load_task
from cogumi.evaluate.tasks import TASKS

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ValidationPlan:
    """Everything resolved from config + command line before any work starts."""

    phase: str
    candidate: Path
    baseline: str  # a model folder, a hub id, or a samples.jsonl path
    baseline_stored: bool
    tasks: list
    sources: dict  # task -> {"source": .., "subset": ..}
    gates: dict
    limit: int | None
    reference: dict  # {label, task: {rate: percent}}: shown beside the results, never gated


def build_plan(config: PhaseConfig, args, source: str) -> ValidationPlan:
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
    reference = check_reference(v.reference, list(v.tasks), f"{source}: validate.reference")
    if not gates:
        log.warning("%s has no validate.gates: reports only, and no %s stamp", source, VALIDATED_STAMP)
    limit = args.limit if args.limit is not None else v.limit
    for key, value in (("limit", limit), ("max_new_tokens", v.max_new_tokens), ("batch_size", v.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"validate.{key} must be at least 1, got {value}", where=f"{source}: validate.{key}",
                            fix=f"e.g. validate.{key}=" + {"limit": "20", "max_new_tokens": "512"}.get(key, "8"))
    sources = {task: _task_source(task, v.data.get(task, TASKS[task].default_source), source) for task in v.tasks}
    unknown = set(v.data) - set(v.tasks)
    if unknown:
        log.warning("validate.data names tasks that are not run: %s", ", ".join(sorted(unknown)))
    return ValidationPlan(config.name, candidate, baseline, stored, list(v.tasks), sources, gates, limit, reference)


def _task_source(task: str, spec, source: str) -> dict:
    """validate.data.<task>: a source name or JSONL path, or {source: math500, subset: "level=4|5"}."""
    if isinstance(spec, str):
        return {"source": spec, "subset": None}
    if (isinstance(spec, dict) and isinstance(spec.get("source"), str) and set(spec) <= {"source", "subset"}
            and isinstance(spec.get("subset"), str | None)):
        return {"source": spec["source"], "subset": spec.get("subset")}
    raise UserError(f"validate.data.{task} must be a source name, a JSONL path or {{source, subset}}",
                    where=f"{source}: validate.data.{task}", fix=f"e.g. data: {{{task}: {TASKS[task].default_source}}}")


def verify_candidate(plan: ValidationPlan) -> dict[str, str]:
    """The candidate's weight files, checked whole against its manifest before anything is judged; their hashes.

    A truncated or overwritten shard is a one-screen error here, never a verdict and never a stamp. So is a candidate
    whose manifest is missing, malformed, not a merge's, or without whole-file hashes: nothing would show that the
    bytes judged are the merge's, and a stamp must never vouch for bytes nobody recorded (ISSUES_LOG B47).
    """
    remake = (f"merge again: `FORCE=1 make merge PHASE={plan.phase.removeprefix('phase')}` (the damaged folder is "
               "moved aside); it writes the manifest with every weight file's sha256")
    manifest = read_manifest(plan.candidate)  # not JSON, or a kind this project never writes: a one-screen error
    where = str(plan.candidate / MANIFEST)
    if manifest is None:
        raise UserError(f"the candidate {plan.candidate} has no {MANIFEST}: it is not a finished merge, so nothing "
                        "records what its weights should be and it cannot be stamped", where=where, fix=remake)
    if manifest["kind"] not in ("merged", "quantized"):
        raise UserError(f"the candidate's {MANIFEST} says kind {manifest['kind']!r}: only a merged (or quantized) "
                        "model is validated", where=where, fix=remake)
    if manifest["kind"] == "quantized":  # `make validate ARGS="--candidate <phase>_merged-nf4"`: what quantizing costs
        remake = (f"quantize again: `FORCE=1 make quantize PHASE={plan.phase.removeprefix('phase')}` (it records "
                   "every weight file's sha256)")
    recorded = manifest.get("weights_sha256")
    if not (isinstance(recorded, dict) and recorded and all(isinstance(v, str) for v in recorded.values())):
        raise UserError(f"the candidate's {MANIFEST} has no whole-file weight hashes (weights_sha256; written before "
                        "they existed, or edited): its bytes cannot be checked, so it cannot be stamped",
                        where=where, fix=remake)
    made_by = "the merge" if manifest["kind"] == "merged" else "the quantization"
    return verify_weights(plan.candidate, recorded, against=f"its manifest.json ({made_by})", fix=remake)


def build_problems(plan: ValidationPlan, seed: int) -> dict:
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


def build_baseline(plan: ValidationPlan, problems: dict) -> tuple[str | None, dict | None]:
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


def pair_task(task: str, problems: list, cand_out: list[str], base_out: list[str], *,
              capped: tuple = ((), ())) -> tuple[dict, list[dict]]:
    """Judge both sides, then one outcome per problem: the task summary and its sample rows.

    capped: (candidate, baseline) indices of outputs cut off at max_new_tokens (Generation.capped)."""
    cand_v = TASKS[task].judge(problems, cand_out, set(capped[0] or ()))
    base_v = TASKS[task].judge(problems, base_out, set(capped[1] or ()))
    rows = []
    for p, co, bo, cv, bv in zip(problems, cand_out, base_out, cand_v, base_v, strict=True):
        rows.append({"task": task, "id": p.id, "prompt": p.prompt, "gold": p.answer if task == "math" else p.tests,
                     "outcome": outcome(cv.passed, bv.passed, cv.judge_error or bv.judge_error),
                     "candidate": _side(co, cv), "baseline": _side(bo, bv)})
    return summarize([r["outcome"] for r in rows]), rows


def _side(output: str, verdict) -> dict:
    return {"output": output, "passed": verdict.passed, "reason": verdict.reason, "extracted": verdict.extracted,
            "judge_error": verdict.judge_error}


def build_report(plan: ValidationPlan, config: PhaseConfig, summaries: dict, gate_results: list) -> dict:
    v = config.validate
    return {
        "phase": plan.phase, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # No gates: nothing vouches for the model.
        "passed": bool(gate_results) and all(g.passed for g in gate_results),
        "candidate": str(plan.candidate), "baseline": plan.baseline, "baseline_stored": plan.baseline_stored,
        "limit": plan.limit, "seed": v.seed, "max_new_tokens": v.max_new_tokens, "batch_size": v.batch_size,
        "tasks": summaries, "gates": [g._asdict() for g in gate_results], "reference": plan.reference,
    }


def stamp_validated(plan: ValidationPlan, report: dict, report_json: Path, weights: dict[str, str]) -> None:
    """VALIDATED: what passed, against what, and the whole-file hashes of the weights it vouches for."""
    write_stamp(plan.candidate, {
        "time": report["created"], "report": str(report_json), "baseline": plan.baseline,
        "n": {t: s["n"] for t, s in report["tasks"].items()}, "gates": report["gates"],
    }, weights_sha256=weights)


def warn_base_mismatch(plan: ValidationPlan, config: PhaseConfig) -> None:
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
                     f"McNemar p={s['mcnemar_p']:.3g}"
                     + (f"  judge errors {s['judge_errors']} (left out)" if s.get("judge_errors") else ""))
        if task in report.get("reference", {}):
            lines.append(f"       reference, not a gate ({report['reference']['label']}): "
                         f"{describe_reference(report['reference'][task])}")
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
