"""Train any phase's LoRA from its config, on a full-precision (bf16) base, resuming automatically.

    make train PHASE=1a
    make train PHASE=1a ARGS="train.max_steps=50 lora.r=8"
    python scripts/train_phase1a_fullprecision.py --phase 1b train.learning_rate=1e-4
    make train PHASE=1a GPUS=2      # torchrun --standalone --nproc_per_node 2: DDP, same effective batch (MULTI_GPU.md)

Environment: RESUME=0 moves an existing run folder aside and starts fresh (nothing is deleted); FORCE=1 lets a base
without its VALIDATED stamp through (recorded in the adapter's manifest) and a changed config resume a checkpoint.

The name is the original project's; it trains every phase. Exit codes: 0 done, 2 user error, 3 disk stop (resumable);
under torchrun a failed rank makes torchrun exit 1 (the rank's own message and code are in its log).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from contextlib import nullcontext

from cogumi.core.config import load_config, phase_config_path, save_resolved
from cogumi.core.errors import EXIT_OK, run_main
from cogumi.core.tracking import track_phase
from cogumi.train import distributed
from cogumi.train.data import encode_data, read_data
from cogumi.train.disk import estimate_checkpoint_bytes, preflight, sidecar
from cogumi.train.fastpath import fast_path
from cogumi.train.layout import choose_layout, read_saved_layout
from cogumi.train.model import build_base, build_model, build_tokenizer, resolve_runtime, trainable_parameters
from cogumi.train.outputs import export_adapter, finished_adapter, summary
from cogumi.train.packed_attention import packed_attention
from cogumi.train.plots import plot_loss
from cogumi.train.trainer import Trainer, make_plan, prepare_run_dir
from cogumi.train.trainlog import TRAIN_LOG

log = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="1a", help="1a, 1b, demo, or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip() not in {"", "0", "false", "no"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    force, fresh = env_flag("FORCE", "0"), not env_flag("RESUME", "1")
    config = load_config(phase_config_path(args.phase), args.overrides)
    runtime = resolve_runtime(config.train, packing=config.data.packing)
    # Fused kernels patch model classes, so they go on before any model is built, and come off at the end.
    with distributed.session(runtime), fast_path(config.train.liger, runtime.device.type) as applied:
        return train(config, dataclasses.replace(runtime, fast_path=applied), args.phase, force=force, fresh=fresh)


def train(config, runtime, phase: str, *, force: bool, fresh: bool) -> int:
    log.info("config %s -> outputs in %s\n%s", phase, config.run_dir, _resolved_yaml(config))
    rows = read_data(config.data)  # a missing or malformed data file fails in seconds, not after a 16 GB download
    base = build_base(config, force=force)  # refuses quantized / unvalidated bases before any weight loads
    # After the guards, so a refused run moves nothing aside. Rank 0 alone touches the run folder and picks the
    # checkpoint; every rank resumes from the path it broadcasts.
    resume_from = distributed.on_main(prepare_run_dir, config, fresh=fresh)
    distributed.on_main(save_resolved, config, config.run_dir / "config.resolved.yaml")
    tokenizer = build_tokenizer(base)
    encoded = encode_data(config.data, rows, tokenizer, seed=config.train.seed)
    # The step count depends on the data size and the effective batch only, so it is known before the model loads.
    plan = make_plan(config, len(encoded.items), encoded.stats.tokens)
    log.info("%s", plan.describe())
    if resume_from is not None and (done := finished_adapter(config, plan.total_steps)):
        log.info("this run already finished (%d steps, final loss %s): %s; RESUME=0 trains again",
                 done["steps"], done.get("final_loss"), config.adapter_dir)
        return EXIT_OK

    model = build_model(config, base, runtime)
    # Packed rows: the model's attention layers take per-example segments (undone when training ends).
    with packed_attention(model, runtime.packed_kernel) if runtime.packed_kernel else nullcontext():
        return fit(config, model, base, runtime, encoded, plan, resume_from, force=force)


def fit(config, model, base, runtime, encoded, plan, resume_from, *, force: bool) -> int:
    # The layout (micro-batch, accumulation, checkpointed layers) may come from a memory probe of the model, and
    # the batch stream needs it: model, then layout, then batches.
    layout = choose_layout(config, model, runtime, plan.effective_batch, encoded, saved=read_saved_layout(resume_from))
    log.info("%s", layout.describe())
    batches = encoded.batches(layout.micro_batch_size, rank=runtime.rank, world_size=runtime.world_size,
                              grad_accum=layout.grad_accum)
    estimate = estimate_checkpoint_bytes(sum(p.numel() for p in trainable_parameters(model)))
    distributed.on_main(preflight, config, checkpoint_bytes_estimate=estimate,
                        merged_bytes_estimate=base.weights_bytes)
    trainer = Trainer(config, model, batches, runtime, plan, layout, checkpoint_estimate=estimate)
    if resume_from is not None:
        trainer.resume(resume_from, force=force)
    # One disk monitor and one tracker per run, on rank 0; the tracker starts where a resume left off.
    with sidecar(config) if runtime.is_main else nullcontext(), \
            track_phase(config, enabled=runtime.is_main, start_step=trainer.step) as tracker:
        result = trainer.fit(tracker)
    distributed.on_main(finish, config, model, base, runtime, result)
    return EXIT_OK


def finish(config, model, base, runtime, result) -> None:
    """Rank 0: the adapter, the loss plot and the one-screen summary."""
    adapter = export_adapter(config, model, base, runtime, result)
    plot = plot_loss(config.run_dir / TRAIN_LOG, config.run_dir / "loss.png", title=config.name)
    print(summary(config, result, adapter, plot))


def _resolved_yaml(config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None).rstrip()


if __name__ == "__main__":
    run_main(main)
