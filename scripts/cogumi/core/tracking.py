"""Experiment tracking a user switches on with `train.report_to: none | tensorboard | wandb` (or a list of both).

Training logs what train_log.jsonl logs (loss, lr, real tokens/s, peak memory) at the same steps, plus the resolved
config; `make validate` adds the win/tie/loss table of each task to the same run. train_log.jsonl stays the record
of truth; trackers are views of it, so a tracker that fails to start warns and the run goes on.

Where it goes, under the phase's run folder (checkpoints/<phase>/):
  tensorboard/   event files (`tensorboard --logdir checkpoints`); a resumed run purges the steps it redoes
  wandb/         wandb's own folder; WANDB_MODE=offline writes there with no network (`wandb sync` uploads later).
                 The run id is kept in wandb_run_id, so validation and resumed training land in the same run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)

REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"
OUTCOME_RATES = ("win", "tie_right", "tie_wrong", "loss")


def parse_report_to(value, where: str = "train.report_to") -> tuple[str, ...]:
    """none | tensorboard | wandb | a list of those -> the reporters, in order, without repeats."""
    items = [value] if isinstance(value, str) or value is None else value
    if not isinstance(items, list | tuple):
        raise UserError(f"train.report_to must be none, tensorboard, wandb or a list of them, got {value!r}",
                        where=where, fix="e.g. train.report_to=tensorboard or train.report_to=[tensorboard,wandb]")
    names = []
    for item in items:
        if item in (None, "none"):
            continue
        if item not in REPORTERS:
            raise UserError(f"unknown train.report_to '{item}'", where=where,
                            fix=f"use none, {', '.join(REPORTERS)}, or a list of them")
        if item not in names:
            names.append(item)
    for name in names:  # at config load, so a missing package fails in seconds, not after the model loads
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.report_to asks for {name}, which is not installed", where=where,
                            fix="run `make setup` (it installs requirements/tracking.txt), or train.report_to=none")
    return tuple(names)


class Tracker:
    """The writers of one process; every method is a no-op when no reporter is on."""

    def __init__(self, run_dir: Path, name: str, reporters: tuple[str, ...], config: dict, *, start_step: int = 0):
        self.writers = {}
        for reporter in reporters:
            try:
                self.writers[reporter] = _OPEN[reporter](Path(run_dir), name, config, start_step)
            except Exception as err:  # e.g. wandb online with no network or login: train_log.jsonl still records
                log.warning("%s tracking is off for this run: it could not start (%s: %s); for wandb without a "
                            "network, set WANDB_MODE=offline", reporter, type(err).__name__, err)

    def log(self, row: dict) -> None:
        """One train_log.jsonl row: its `step` and every number in it, under train/."""
        step = row["step"]
        metrics = {f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if "tensorboard" in self.writers:
            for key, value in metrics.items():
                self.writers["tensorboard"].add_scalar(key, value, step)
        if "wandb" in self.writers:
            self.writers["wandb"].log(metrics, step=step)

    def log_validation(self, report: dict, step: int | None = None) -> None:
        """The win/tie/loss table of a validation report (one row per task), its p-values and its verdict."""
        rows = [[task, s["n"], *(round(s["pct"][r], 2) for r in OUTCOME_RATES), s["mcnemar_p"],
                 s.get("regression_p")] for task, s in report["tasks"].items()]
        columns = ["task", "n", *(f"{r}_pct" for r in OUTCOME_RATES), "mcnemar_p", "regression_p"]
        scalars = {f"validate/{row[0]}/{col}": value for row in rows for col, value in zip(columns[1:], row[1:],
                                                                                           strict=True)
                   if value is not None}
        scalars["validate/passed"] = int(report["passed"])
        if "tensorboard" in self.writers:
            writer = self.writers["tensorboard"]
            for key, value in scalars.items():
                writer.add_scalar(key, value, step or 0)
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
            writer.add_text("validate/win_tie_loss", "\n".join(table), step or 0)
        if "wandb" in self.writers:
            import wandb

            run = self.writers["wandb"]
            run.log({"validate/win_tie_loss": wandb.Table(columns=columns, data=rows)})
            run.summary.update(scalars)

    def close(self) -> None:
        for reporter, writer in self.writers.items():
            try:
                writer.close() if reporter == "tensorboard" else writer.finish()
            except Exception as err:  # a view of the log failing to flush must not fail a finished run
                log.warning("could not close the %s tracker: %s", reporter, err)
        self.writers = {}


@contextmanager
def tracking(run_dir: Path, name: str, report_to, config: dict, *, enabled: bool = True, start_step: int = 0):
    """A Tracker for one stage; `enabled=False` (ranks other than 0) gives one that writes nothing."""
    tracker = Tracker(run_dir, name, parse_report_to(report_to) if enabled else (), config, start_step=start_step)
    try:
        yield tracker
    finally:
        tracker.close()


def track_phase(config, *, enabled: bool = True, start_step: int = 0):
    """The tracker of a phase (a PhaseConfig: typed loosely, since config imports this module): its run folder,
    name, train.report_to and resolved config."""
    return tracking(config.run_dir, config.name, config.train.report_to, config.to_dict(), enabled=enabled,
                    start_step=start_step)


def record_validation(config, report: dict) -> None:
    """After `make validate`: the report's win/tie/loss table into the phase's tracking run (when report_to asks)."""
    with track_phase(config) as tracker:
        tracker.log_validation(report)


def no_tracker() -> Tracker:
    return Tracker(Path("."), "", (), {})


def _open_tensorboard(run_dir: Path, name: str, config: dict, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: after a resume from step T the steps past T are logged again; tensorboard drops the old ones
    # (as train_log.jsonl is cut back to T), and keeps T itself, which the resumed run does not log again.
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    import yaml

    writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", start_step)
    return writer


def _open_wandb(run_dir: Path, name: str, config: dict, start_step: int):
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    # The project comes from WANDB_PROJECT when set; WANDB_MODE=offline needs no network and no login.
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "cogumi-llm"), name=name, id=run_id, resume="allow",
                      dir=str(run_dir), config=config)


_OPEN = {"tensorboard": _open_tensorboard, "wandb": _open_wandb}
