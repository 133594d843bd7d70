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
import pickle
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as torch_dist

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)

# A collective that waits longer than this fails instead of hanging (a rank died without torchrun noticing, e.g.
# on another host). Long enough for rank 0's memory probe and a checkpoint save of an 8B LoRA.
DEFAULT_TIMEOUT_S = 1800

# Every tensor this module hands a collective stays referenced from Python for the life of the process (B42). With
# gloo (torch 2.3) the group's worker thread frees a finished work under the group's mutex; if that work held the last
# reference to a tensor made in Python, freeing it needs the GIL. destroy_process_group (or the group's last
# reference going away) takes that mutex while holding the GIL: both wait forever. torch's own object collectives
# drop their tensors on return, so a 2-rank session of broadcasts hung at its end in 1 run of 6. The cost is a few
# hundred bytes per collective (about one per optimizer step).
_HANDED: list[torch.Tensor] = []


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
    payload = pickle.dumps(obj) if torch_dist.get_rank() == 0 else b""
    size = _handed(torch.tensor([len(payload)], dtype=torch.int64, device=_device()))
    torch_dist.broadcast(size, src=0)
    data = _handed(_bytes_tensor(payload, int(size.item())))
    torch_dist.broadcast(data, src=0)
    return pickle.loads(data.cpu().numpy().tobytes())


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active():
        return [obj]
    world = torch_dist.get_world_size()
    payload = pickle.dumps(obj)
    size = _handed(torch.tensor([len(payload)], dtype=torch.int64, device=_device()))
    sizes = [_handed(torch.zeros_like(size)) for _ in range(world)]
    torch_dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = _handed(_bytes_tensor(payload + b"\0" * (longest - len(payload)), longest))
    parts = [_handed(torch.empty_like(padded)) for _ in range(world)]
    torch_dist.all_gather(parts, padded)
    return [pickle.loads(part.cpu().numpy().tobytes()[:int(n.item())]) for part, n in zip(parts, sizes, strict=True)]


def sum_values(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (one small all-reduce)."""
    if not active():
        return list(values)
    t = _handed(torch.tensor(values, dtype=torch.float64, device=device))
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


def _handed(tensor: torch.Tensor) -> torch.Tensor:
    _HANDED.append(tensor)
    return tensor


def _device() -> torch.device:
    """Where the collectives' tensors live: the current GPU under NCCL, the CPU under gloo."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bytes_tensor(payload: bytes, size: int) -> torch.Tensor:
    """`payload` as a uint8 tensor on the collectives' device (an empty one of `size` bytes where payload is b"")."""
    if not payload:
        return torch.empty(size, dtype=torch.uint8, device=_device())
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(_device())
