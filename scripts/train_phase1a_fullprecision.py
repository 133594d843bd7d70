"""Train any phase's LoRA from its config, on a full-precision (bf16) base, resuming automatically.

    make train PHASE=1a
    make train PHASE=1a ARGS="train.max_steps=50 lora.r=8"
    python scripts/train_phase1a_fullprecision.py --phase 1b train.learning_rate=1e-4
    make train PHASE=1a GPUS=2      # torchrun --standalone --nproc_per_node 2: DDP, same effective batch (MULTI_GPU.md)

Switches (environment or make variables, cogumi.core.switches): RESUME=0 starts fresh (the existing run folder is
moved aside once every check passed; nothing is deleted); ALLOW_UNVALIDATED=1 trains on a merged base without its
VALIDATED stamp (recorded in the adapter's manifest); PLAIN_BASE=1 takes a base folder shaped like a phase output but
without manifest.json as a plain model (recorded too); RESUME_CHANGED=1 resumes a checkpoint saved with different
training settings (the changed keys are logged). One run of a phase at a time (cogumi.core.runlock).

The name is the original project's; it trains every phase. Exit codes: 0 done, 2 user error (nothing changed on
disk), 3 disk stop (resumable), 130 interrupted (Ctrl-C or SIGTERM; resumable); under torchrun a failed rank makes
torchrun exit 1 (the rank's own message and code are in its log).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from contextlib import nullcontext

from cogumi.core import runlock
from cogumi.core.config import load_config, phase_config_path, resolved_yaml, save_resolved
from cogumi.core.errors import EXIT_OK, note_on_interrupt, run_main
from cogumi.core.switches import switch
from cogumi.core.tracking import track_phase
from cogumi.evaluate.pairing import check_gates
from cogumi.train import distributed
from cogumi.train.checkpoints import resume_note
from cogumi.train.data import encode_data, read_data
from cogumi.train.disk import estimate_checkpoint_bytes, preflight, sidecar
from cogumi.train.export import export_adapter, finished_adapter, next_command, summary
from cogumi.train.fastpath import fast_path
from cogumi.train.heldout import eval_share
from cogumi.train.layout import choose_layout, read_saved_layout
from cogumi.train.model import build_base, build_model, build_tokenizer, resolve_runtime, trainable_parameters
from cogumi.train.packed_attention import packed_attention
from cogumi.train.plots import plot_loss
from cogumi.train.selftest import require_kernels
from cogumi.train.trainer import Trainer, choose_resume, claim_run_dir, make_plan
from cogumi.train.trainlog import TRAIN_LOG

log = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="1a", help="1a, 1b, demo, or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fresh, allow_changed = not switch("RESUME"), switch("RESUME_CHANGED")
    allow_unvalidated, plain_base = switch("ALLOW_UNVALIDATED"), switch("PLAIN_BASE")
    config = load_config(phase_config_path(args.phase), args.overrides)
    check_gates(config.validate.gates, list(config.validate.tasks), source=f"{args.phase}: validate.gates")
    note_on_interrupt(lambda: resume_note(config.run_dir, fresh=fresh))  # the Ctrl-C line says where a rerun starts
    runtime = resolve_runtime(config.train, packing=config.data.packing)
    # One run of a phase at a time: rank 0 holds the lock for the whole run (torchrun's ranks are one run).
    lock = runlock.hold_run(config.run_dir.parent, config.name) if runtime.is_main else nullcontext()
    # Fused kernels patch model classes, so they go on before any model is built, and come off at the end.
    with distributed.session(runtime), lock, fast_path(config.train.liger, runtime.device.type) as applied:
        # Seconds on a GPU: every kernel the run will launch, against the plain formula with rows that differ. A
        # kernel that is wrong or does not compile on this stack refuses the run here, not at step 1 (B38, B40).
        require_kernels(applied, runtime.device, runtime.dtype, runtime.packed_kernel)
        return train(config, dataclasses.replace(runtime, fast_path=applied), args.phase, args.overrides,
                     fresh=fresh, allow_unvalidated=allow_unvalidated, plain_base=plain_base,
                     allow_changed=allow_changed)


def train(config, runtime, phase: str, overrides: list[str], *, fresh: bool, allow_unvalidated: bool,
          plain_base: bool, allow_changed: bool) -> int:
    # One line, not the whole config: a refusal below must be the first screen the user sees. The resolved config
    # goes to config.resolved.yaml once the checks pass (`make config` prints it without starting a run).
    log.info("config %s -> outputs in %s", phase, config.run_dir)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("resolved config:\n%s", resolved_yaml(config))
    rows = read_data(config.data)  # a missing or malformed data file fails in seconds, not after a 16 GB download
    # Refuses quantized, unvalidated, changed-since-validated and misreadable bases, and unknown LoRA targets,
    # before any weight loads.
    base = build_base(config, allow_unvalidated=allow_unvalidated, plain_base=plain_base)
    # Rank 0 alone picks the checkpoint; every rank resumes from the path it broadcasts. Nothing is moved or
    # written until every check below passed (claim_run_dir): a refused run changes nothing on disk.
    resume_from = distributed.on_main(choose_resume, config, fresh=fresh)
    tokenizer = build_tokenizer(base)
    encoded = encode_data(config.data, rows, tokenizer, seed=config.train.seed)
    # The step count depends on the data size and the effective batch only, so it is known before the model loads.
    plan = make_plan(config, len(encoded.items), encoded.stats.tokens)
    log.info("%s", plan.describe())
    if encoded.held_out:
        every = config.train.eval_every or config.checkpoints.save_steps
        share = eval_share(plan.total_steps, plan.tokens_per_step, every, encoded.held_out_tokens)
        log.info("eval: eval_loss every %d steps and at the last: about %.1f %% of the training compute", every,
                 100 * share)
    if resume_from is not None and (done := finished_adapter(config, plan.total_steps)):
        log.info("this run already finished (%d steps, final loss %s): %s; RESUME=0 trains again",
                 done["steps"], done.get("final_loss"), config.adapter_dir)
        return EXIT_OK

    model = build_model(config, base, runtime)
    # Packed rows: the model's attention layers take per-example segments (undone when training ends).
    with packed_attention(model, runtime.packed_kernel) if runtime.packed_kernel else nullcontext():
        return fit(config, model, base, runtime, encoded, plan, resume_from, fresh=fresh, allow_changed=allow_changed,
                   next_step=next_command(phase, overrides))


def fit(config, model, base, runtime, encoded, plan, resume_from, *, fresh: bool, allow_changed: bool,
        next_step: str) -> int:
    # The layout (micro-batch, accumulation, checkpointed layers) may come from a memory probe of the model, and
    # the batch stream needs it: model, then layout, then batches.
    layout = choose_layout(config, model, runtime, plan.effective_batch, encoded, saved=read_saved_layout(resume_from))
    log.info("%s", layout.describe())
    batches = encoded.batches(layout.micro_batch_size, rank=runtime.rank, world_size=runtime.world_size,
                              grad_accum=layout.grad_accum)
    estimate = estimate_checkpoint_bytes(sum(p.numel() for p in trainable_parameters(model)))
    distributed.on_main(preflight, config, checkpoint_bytes_estimate=estimate,
                        merged_bytes_estimate=base.weights_bytes)
    trainer = Trainer(config, model, batches, runtime, plan, layout, checkpoint_estimate=estimate,
                      held_out=encoded.held_out)
    if resume_from is not None:
        trainer.resume(resume_from, allow_changed=allow_changed)  # the last check; it cuts the log back
    distributed.on_main(claim_run_dir, config, fresh=fresh, resuming=resume_from is not None)
    distributed.on_main(save_resolved, config, config.run_dir / "config.resolved.yaml")
    # One disk monitor and one tracker per run, on rank 0; the tracker starts where a resume left off.
    with sidecar(config) if runtime.is_main else nullcontext(), \
            track_phase(config, enabled=runtime.is_main, start_step=trainer.step) as tracker:
        result = trainer.fit(tracker)
    distributed.on_main(finish, config, model, base, runtime, result, next_step)
    return EXIT_OK


def finish(config, model, base, runtime, result, next_step: str) -> None:
    """Rank 0: the adapter, the loss plot and the one-screen summary."""
    adapter = export_adapter(config, model, base, runtime, result)
    plot = plot_loss(config.run_dir / TRAIN_LOG, config.run_dir / "loss.png", title=config.name)
    print(summary(config, result, adapter, plot, next_step))


if __name__ == "__main__":
    run_main(main)
