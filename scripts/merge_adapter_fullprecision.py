"""Merge a phase's LoRA adapter into its bf16 base, shard by shard, then verify the result.

    make merge PHASE=1a                       # configs/phase1a.yaml
    make merge PHASE=1a ARGS="--no-verify"    # huge models on a small machine: the report says it was skipped
    FORCE=1 make merge PHASE=1a               # replace an existing merged output (the old one is moved aside)

Reads checkpoints/<name>/adapter/ and writes checkpoints/<name>_merged/ (weights, tokenizer, config,
manifest.json, merge_report.json). Exit codes: 0 merged (and verified), 1 verification failed (output kept
aside as <out>.failed-<stamp>), 2 refused before anything was written (quantized base, lineage, disk, another
training or merge of the same run holding its lock, ...). FORCE is parsed by cogumi.core.switches.
"""

from __future__ import annotations

import argparse
import logging

from cogumi.core import runlock
from cogumi.core.config import load_config, phase_config_path
from cogumi.core.errors import EXIT_FAILED, EXIT_OK, run_main
from cogumi.core.manifest import sha256_json
from cogumi.core.switches import switch
from cogumi.merge import stream

log = logging.getLogger("merge")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, help="phase name (1a, 1b, demo) or a path to a config YAML")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the logits comparison (it loads one float32 model); the report says skipped")
    parser.add_argument("overrides", nargs="*", help="config overrides like merge.verify_prompts=2")
    return parser.parse_intermixed_args(argv)


def build_job(config, args: argparse.Namespace) -> stream.MergeJob:
    return stream.MergeJob(
        base_model=config.base_model, adapter_dir=config.adapter_dir, out_dir=config.merged_dir,
        verify=config.merge.verify and not args.no_verify, verify_prompts=config.merge.verify_prompts,
        max_abs_diff=config.merge.max_abs_diff, min_top1_agreement=config.merge.min_top1_agreement,
        force=switch("FORCE"), margin_bytes=config.disk.margin_mb << 20,
        config_hash=sha256_json(config.to_dict()),
    )


def summarize(report: dict) -> None:
    check = report["verification"]
    # the verifier's own log line has every rule's numbers; this one says which rule decided, and by how much
    verdict = "verification SKIPPED" if check.get("skipped") else (
        f"verification passed by {check['decided_by']} (closest margin {check['margin']:.3g}x)" if check["passed"]
        else f"verification FAILED by the {check['decided_by']} rule: {check['rules'][check['decided_by']]['says']}")
    log.info("merged %d tensors in %d shards in %.1f s (peak RSS %.0f MB merging, %.0f MB in all); %s",
             report["tensors_updated"], report["shards"], report["wall_seconds"], report["peak_rss_merge_mb"],
             report["peak_rss_mb"], verdict)
    log.info("output: %s", report["output"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(phase_config_path(args.phase), args.overrides)
    job = build_job(config, args)
    # One process per run: a merge while the same run trains or merges would read or replace half-written files.
    with runlock.hold_run(config.run_dir.parent, config.name):
        report = stream.run_merge(job)
    summarize(report)
    return EXIT_OK if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    run_main(main)
