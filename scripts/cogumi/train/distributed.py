"""Several processes (one per GPU, started by torchrun): set-up and the few collectives the trainer needs.

Every function is a no-op (or the identity) in a single process, so the training script has one code path.
Rank 0 alone touches shared files (run folder, checkpoints, logs, adapter, plots); `on_main` runs such work there
and hands its result, or its error, to every rank, so a refusal on rank 0 ends all ranks with the same message
instead of leaving them blocked in the next collective.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)

# A collective that waits longer than this fails instead of hanging (a rank died without torchrun noticing, e.g.
# on another host). Long enough for rank 0's memory probe and a checkpoint save of an 8B LoRA.
DEFAULT_TIMEOUT_S = 1800


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


@contextmanager
def session(runtime):
    """Join the process group torchrun set up (WORLD_SIZE > 1), and leave it however the block ends."""
    if runtime.world_size <= 1:
        yield
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)  # NCCL and the object collectives use the current device
    timeout = dt.timedelta(seconds=float(os.environ.get("COGUMI_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    torch_dist.init_process_group(backend, timeout=timeout)
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the INFO log: rank 0's
    log.info("distributed: %d processes, backend %s, collective timeout %s", runtime.world_size, backend, timeout)
    try:
        yield
    except BaseException:
        # No barrier and no teardown: a rank that fails alone must exit now, and torchrun then ends the others
        # (their next collective fails, or they get SIGTERM). A barrier here would wait for ranks that never come.
        raise
    # Leave together: with gloo (torch 2.3), a rank whose peer already exited hangs in the process group's
    # destructor (measured: a 3 s head start of one rank was enough).
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def barrier() -> None:
    if active():
        torch_dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def sum_values(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (one small all-reduce)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def on_main(fn: Callable, *args, **kwargs):
    """Run fn on rank 0 only; every rank returns its result, or raises its UserError (same exit code).

    Any other exception on rank 0 is re-raised there and becomes a RuntimeError on the other ranks.
    """
    if not active():
        return fn(*args, **kwargs)
    outcome, error = None, None
    if torch_dist.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except UserError as err:
            error = err
            outcome = ("user", (err.what, err.where, err.fix, err.exit_code))
        except BaseException as err:
            error = err
            outcome = ("other", f"{type(err).__name__}: {err}")
    outcome = broadcast(outcome)
    if error is not None:
        raise error
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "user":
        what, where, fix, code = value
        err = UserError(what, where=where, fix=fix)
        err.exit_code = code
        raise err
    raise RuntimeError(f"rank 0 failed: {value}")
