"""Rehearse a phase: every step for a few minutes with the real base and data, then the run card.

    make rehearse PHASE=1a                      # train a few dozen steps (+ a Ctrl-C and a resume), merge, validate
    make rehearse PHASE=demo                    # the demo config on a CPU (needs `make demo`'s base once)
    python scripts/rehearse.py --phase 1a --steps 40 --problems 8
    make rehearse PHASE=1a ARGS="--card-json card.json"   # the card's numbers as JSON too

Works in a hidden folder beside the real runs (`<output_root>/.rehearse-<name>-<pid>/`) and removes it at the end;
the phase's own run folder is never touched. Prints the predicted wall time, GPU-hours and peak disk of the whole
phase. Exit 0 when every step ran (a validation that fails its gates on a few problems is expected), 2 otherwise.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cogumi import rehearsal
from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_FAILED, EXIT_OK, run_main
from cogumi.core.fsutil import atomic_write_json

log = logging.getLogger("rehearse")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", required=True, help="1a, 1b, demo, or a path to a phase YAML")
    parser.add_argument("--steps", type=int, default=24, help="training steps of the rehearsal (a checkpoint half-way)")
    parser.add_argument("--problems", type=int, default=4, help="validation problems per task")
    parser.add_argument("--card-json", help="also write the card's predicted numbers (seconds, disk) to this file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied to the real run too")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config_path = str(phase_config_path(args.phase))
    real = load_config(config_path, args.overrides)  # every config mistake surfaces here, before any work
    rows, tokens = rehearsal.data_shape(real)
    root = rehearsal.rehearsal_root(real)
    step_args = ["--phase", config_path, *args.overrides, *rehearsal.overrides_for(root, args.steps, args.problems)]
    config = load_config(config_path, step_args[2:])
    measured = rehearsal.Measured()
    try:
        rehearsal.train_interrupted_then_resumed(step_args, config.run_dir, measured)
        rehearsal.run_step("merge", rehearsal.MERGE, step_args, measured)
        # a few problems cannot pass the phase's n_min gates: exit 1 is the expected verdict here
        rehearsal.run_step("validate", rehearsal.VALIDATE, step_args, measured, ok=(0, 1))
        rehearsal.measure(config, measured)
        prompts = rehearsal.full_problem_prompts(real, config_path, config.merged_dir)
        # the full run decodes many rows a batch: its rate is measured at that size, not the rehearsal's few rows
        rehearsal.probe_decoding(real, prompts, config.merged_dir, measured)
        problems = {task: len(texts) for task, texts in prompts.items()}
        card = rehearsal.predict(real, measured, rows, tokens, args.steps, problems, rehearsal.base_size(real))
    finally:
        rehearsal.cleanup(root)
    print("\n".join(card.lines))
    log.info("predicted: %s", card.predicted)
    if args.card_json:  # for scripts that compare the card with a real run (scripts/bench/gpu_card_check.sh)
        atomic_write_json(Path(args.card_json), card.predicted)
    return EXIT_OK if card.predicted["total_s"] == card.predicted["total_s"] else EXIT_FAILED  # NaN: no tokens/s


if __name__ == "__main__":
    run_main(main)
