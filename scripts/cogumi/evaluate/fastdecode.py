"""Fast greedy decoding: a static KV cache, and on a GPU the one-token decode step captured once as a CUDA graph.

Why: decoding an 8B model at batch 64 through transformers' `generate` (dynamic cache) spends most of each step in
Python and kernel launches (608 tokens/s measured on an H200, docs/PERFORMANCE.md). Here the cache has a fixed
shape, so the decode step always sees the same tensors, and on CUDA it is recorded once as a graph and replayed:
one launch a step. The graph runs the model's own eager kernels (no compiler), so it behaves the same on the pinned
torch 2.3.1 and on newer ones, and needs no compile: recording takes about a second per (batch, length) and is paid
once per loaded model (`Decoder` is kept on the LoadedModel).

Rows that finish early: when half a batch has stopped, the live rows move into a half-size cache (and its own
graph), so a long answer does not keep the whole batch decoding. Every batch is padded to the same length (the
longest prompt of the whole run + max_new_tokens), so no shape ever changes after the first batch.

Greedy outputs equal `generate()`'s (tests/test_fastdecode.py on the tiny model; the 8B-shape check on the GPU is
in scripts/bench/bench_validate.py). On CPU the same loop runs without graphs (used by that test); validation on a
CPU keeps the simple path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

LENGTH_STEP = 64  # the run's cache length is rounded up to this, so nearby runs share graphs
MAX_BATCH = 256  # beyond this, a decode step is bound by weight reads no more: bigger batches gain little
MEMORY_SHARE = 0.85  # of the GPU memory free after loading, for caches and activations


@dataclass
class _Slot:
    """One batch size's static cache and (on CUDA) its captured decode step, with the graph's input tensors."""

    cache: object
    tokens: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, 1]
    cache_position: torch.Tensor  # [1]
    mask: torch.Tensor  # [B, max_len]: 1 where a slot holds a real token
    logits: torch.Tensor | None = None  # the graph's output, [B, 1, vocab]
    graph: object = None


@dataclass
class Decoder:
    """Static caches and graphs of one loaded model, reused by every later call with the same length."""

    batch: int  # the largest cache; smaller ones halve it
    max_len: int
    slots: dict = field(default_factory=dict)  # cache rows -> _Slot
    capture_s: float = 0.0

    def size_for(self, rows: int) -> int:
        """The smallest cache in the chain batch, batch/2, batch/4, ... that holds `rows` rows."""
        size = self.batch
        while size > 1 and (size + 1) // 2 >= rows:
            size = (size + 1) // 2
        return size


def batch_size_for_memory(model, max_len: int, prompt_len: int, device: str, limit: int) -> int:
    """The largest batch whose static cache plus prefill activations fit in the free GPU memory (at most `limit`)."""
    if not device.startswith("cuda"):
        return limit
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * max_len * 2  # bf16 K and V
    # prefill of one row: a few hidden-size activations and the MLP's intermediate per prompt token (eager, bf16)
    prefill_per_row = prompt_len * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    # the halved caches of early-finishing rows add at most as much again as the full one
    fits = int(free * MEMORY_SHARE) // (2 * kv_per_row + prefill_per_row)
    return max(1, min(limit, fits, MAX_BATCH))


def run_length(prompt_lengths: list[int], max_new_tokens: int) -> int:
    longest = max(prompt_lengths) + max_new_tokens
    return -(-longest // LENGTH_STEP) * LENGTH_STEP


def decode_batch(model, decoder: Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, stop_ids: list[int], on_step=None) -> list[list[int]]:
    """Greedy continuations of one left-padded batch: each row's tokens through its first stop id.

    The batch is padded up to a cache size of the decoder (spare rows repeat row 0 and are never read).
    `on_step(live_rows, rows_just_finished)` is called after each decode step (for progress)."""
    rows, prompt_len = input_ids.shape
    device = input_ids.device
    slot = _slot(model, decoder, decoder.size_for(rows), device)
    size = slot.tokens.shape[0]
    take = torch.cat([torch.arange(rows, device=device), torch.zeros(size - rows, dtype=torch.long, device=device)])
    input_ids, attention_mask = input_ids.index_select(0, take), attention_mask.index_select(0, take)
    slot.mask.zero_()
    slot.mask[:, :prompt_len] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        hidden = model.model(input_ids=input_ids, attention_mask=slot.mask, position_ids=positions,
                             cache_position=torch.arange(prompt_len, device=device), past_key_values=slot.cache,
                             use_cache=True).last_hidden_state
        # Only the last position's logits are needed: the full [rows, prompt, vocab] float32 tensor would be the
        # largest allocation of the whole run.
        next_tokens = model.lm_head(hidden[:, -1:]).float().argmax(-1)  # [size, 1]
    slot.positions.copy_(positions[:, -1:])
    stops = torch.tensor(stop_ids, device=device)
    live = torch.where(torch.arange(size, device=device) < rows, take, -1)  # cache row -> batch row (-1: spare)
    generated = []  # per step: (batch row of each cache row, the token each produced)
    running = rows
    for step in range(max_new_tokens):
        generated.append((live, next_tokens[:, 0]))
        keep = ((live >= 0) & ~torch.isin(next_tokens[:, 0], stops)).nonzero()[:, 0]
        n_keep = int(keep.numel())  # one sync a step: the loop must know when the batch is done
        if on_step:
            on_step(n_keep, running - n_keep)
        running = n_keep
        live = torch.where(torch.isin(torch.arange(len(live), device=device), keep), live, -1)  # finished rows
        if n_keep == 0 or step + 1 == max_new_tokens:
            break
        smaller = decoder.size_for(n_keep)
        if smaller < len(live):
            slot, live, next_tokens = _shrink(model, decoder, slot, smaller, keep, live, next_tokens,
                                              prompt_len + step)
        position = prompt_len + step  # the cache slot of the token fed now
        slot.tokens.copy_(next_tokens)
        slot.positions.add_(1)
        slot.cache_position.fill_(position)
        slot.mask[:, position] = 1
        next_tokens = _step(model, slot).argmax(-1)
    if on_step and running:
        on_step(0, running)  # rows cut at max_new_tokens
    out = [[] for _ in range(rows)]
    for rows_at, tokens in generated:  # one copy to the host at the end, not one per step
        for row, token in zip(rows_at.tolist(), tokens.tolist(), strict=True):
            if row >= 0:
                out[row].append(token)
    stop_set = set(stop_ids)
    return [_through_first_stop(ids, stop_set) for ids in out]


def _through_first_stop(ids: list[int], stops: set) -> list[int]:
    for k, token in enumerate(ids):
        if token in stops:
            return ids[: k + 1]
    return ids


def _slot(model, decoder: Decoder, rows: int, device) -> _Slot:
    if rows not in decoder.slots:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_batch_size=rows, max_cache_len=decoder.max_len, device=device,
                            dtype=model.dtype)
        slot = _Slot(cache=cache, tokens=torch.zeros(rows, 1, dtype=torch.long, device=device),
                     positions=torch.zeros(rows, 1, dtype=torch.long, device=device),
                     cache_position=torch.full((1,), decoder.max_len - 1, dtype=torch.long, device=device),
                     mask=torch.zeros(rows, decoder.max_len, dtype=torch.long, device=device))
        if device.type == "cuda":
            started = time.perf_counter()
            try:
                _capture(model, slot)
            except RuntimeError as err:  # an op this transformers runs cannot be captured: decode without graphs
                log.warning("decode step could not be captured as a CUDA graph (%s); decoding without it",
                            str(err).splitlines()[0])
                slot.graph = None
            decoder.capture_s += time.perf_counter() - started
            log.info("decode step for batch %d x %d tokens captured as a CUDA graph in %.1f s", rows,
                     decoder.max_len, time.perf_counter() - started)
        decoder.slots[rows] = slot
    return decoder.slots[rows]


def _forward(model, slot: _Slot) -> torch.Tensor:
    return model(input_ids=slot.tokens, attention_mask=slot.mask, position_ids=slot.positions,
                 cache_position=slot.cache_position, past_key_values=slot.cache, use_cache=True).logits


def _capture(model, slot: _Slot) -> None:
    """Record the decode step. The warm-up runs write only the cache's last slot under an all-zero mask: no batch
    has attended to it yet, and a batch's own step writes it before attending to it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(2):  # the first calls allocate workspaces: never inside a capture
            _forward(model, slot)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        slot.logits = _forward(model, slot)
    slot.graph = graph


def _step(model, slot: _Slot) -> torch.Tensor:
    """Logits [rows, 1, vocab] of the next token for every cache row."""
    if slot.graph is not None:
        slot.graph.replay()
        return slot.logits
    with torch.inference_mode():
        return _forward(model, slot)


def _shrink(model, decoder: Decoder, slot: _Slot, rows: int, keep: torch.Tensor, live: torch.Tensor,
            next_tokens: torch.Tensor, filled: int):
    """Move the unfinished rows into the cache for `rows` rows (its graph is recorded once); spare rows repeat a
    live one and are marked -1."""
    small = _slot(model, decoder, rows, live.device)
    take = torch.cat([keep, keep[:1].expand(rows - len(keep))])
    for caches_from, caches_to in ((slot.cache.key_cache, small.cache.key_cache),
                                   (slot.cache.value_cache, small.cache.value_cache)):
        for src, dst in zip(caches_from, caches_to, strict=True):
            dst[:, :, :filled].copy_(src[:, :, :filled].index_select(0, take))
    small.mask.copy_(slot.mask.index_select(0, take))
    small.positions.copy_(slot.positions.index_select(0, take))
    spare = torch.full((rows - len(keep),), -1, dtype=live.dtype, device=live.device)
    return small, torch.cat([live.index_select(0, keep), spare]), next_tokens.index_select(0, take)
