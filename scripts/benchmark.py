"""Validate a phase: MATH and CODE win/tie/loss of its merged model against a baseline, gated.

    make validate PHASE=1a
    make validate PHASE=1a ARGS="--limit 20"                  # a quick look (n_min gates, if set, fail it)
    make validate PHASE=1b ARGS="--baseline checkpoints/phase1a_merged/validation/samples.jsonl"
    python scripts/benchmark.py --phase 1a validate.max_new_tokens=1024 validate.batch_size=32

Flow: config -> problems -> generate (candidate, then the baseline unless stored samples) -> judge -> pair ->
gates -> reports in <candidate>/validation/. Exit 0 and the VALIDATED stamp only when every gate passes;
otherwise exit 1 and any earlier stamp is gone. One training, merge or validation of a phase at a time
(cogumi.core.runlock): a second one exits 2 naming the first one's pid.
"""

from __future__ import annotations

import argparse
import logging
import os

# The code judge forks worker processes after the tokenizer ran; tokenizers' threads cannot survive a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cogumi.core import runlock
from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_FAILED, EXIT_OK, run_main
from cogumi.core.stamp import remove_stamp
from cogumi.core.tracking import record_validation
from cogumi.evaluate import validate
from cogumi.evaluate.pairing import evaluate_gates
from cogumi.evaluate.report import write_reports

log = logging.getLogger("benchmark")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", required=True, help="1a, 1b, demo, or a path to a phase YAML")
    parser.add_argument("--candidate", help="model folder to validate (default: the phase's merged model)")
    parser.add_argument("--baseline", help="model folder, hub id or samples.jsonl "
                                           "(default: validate.baseline, else the phase's base_model)")
    parser.add_argument("--limit", type=int, help="first N problems per task after the seeded shuffle")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. validate.limit=20")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = phase_config_path(args.phase)
    config = load_config(config_path, args.overrides)
    # One process per run: a merge in progress replaces the model this reads; two validations of one model would
    # write the same reports and stamp.
    with runlock.hold_run(config.run_dir.parent, config.name):
        return run_validation(config, args, str(config_path))


def run_validation(config, args, config_path: str) -> int:
    plan = validate.build_plan(config, args, config_path)
    v = config.validate
    log.info("candidate %s vs baseline %s%s; tasks %s; limit %s; max_new_tokens %d; batch %d", plan.candidate,
             plan.baseline, " (stored samples)" if plan.baseline_stored else "", plan.tasks, plan.limit,
             v.max_new_tokens, v.batch_size)
    validate.warn_base_mismatch(plan, config)
    weights = validate.verify_candidate(plan)  # every byte checked before anything is judged or stamped
    # Data first: a bad source or stored baseline fails in seconds, before minutes of model loading.
    problems = validate.build_problems(plan, v.seed)
    baseline_model, base_out = validate.build_baseline(plan, problems)
    # From here the old verdict no longer describes this run, even if it is interrupted.
    remove_stamp(plan.candidate)
    cand_out, cand_stats = validate.run_generation(plan.candidate, problems, config, "candidate")
    base_stats = {}
    if base_out is None:
        base_out, base_stats = validate.run_generation(baseline_model, problems, config, "baseline")
    summaries, samples = {}, []
    for task in plan.tasks:
        capped = (cand_stats[task].get("capped"), (base_stats.get(task) or {}).get("capped"))
        summaries[task], rows = validate.pair_task(task, problems[task], cand_out[task], base_out[task],
                                                   capped=capped)
        summaries[task].update(source=plan.sources[task]["source"],
                               generation={"candidate": cand_stats[task], "baseline": base_stats.get(task)})
        samples += rows
    gate_results = evaluate_gates(summaries, plan.gates)
    report = validate.build_report(plan, config, summaries, gate_results)
    paths = write_reports(plan.candidate / "validation", report, samples)
    record_validation(config, report)  # the win/tie/loss table into tensorboard / wandb, when train.report_to asks
    print(validate.one_screen(report, gate_results, paths["report.md"]))
    if not report["passed"]:
        return EXIT_FAILED
    validate.stamp_validated(plan, report, paths["report.json"], weights)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
