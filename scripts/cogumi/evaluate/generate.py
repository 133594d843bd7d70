"""Batched greedy generation through the model's own chat template, timed.

One prompt = one user message. Prompts are sorted by length so a batch pads little, left-padded so every row
ends where generation starts, and stopped at the end-of-turn ids the model's generation_config names
(Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>); stopping only at the tokenizer's eos runs every answer to
max_new_tokens on models whose chat turns end with another token.

Two paths, the same greedy tokens: on a GPU, a static cache with the decode step replayed as a CUDA graph, batches
sized by free memory, and finished rows dropped (fastdecode.py); on a CPU, transformers' `generate`. The progress
bar counts finished prompts as each row stops and shows the tokens generated so far.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str  # what the report calls it: a folder path or a hub id
    model: object
    tokenizer: object
    device: str
    dtype: str
    stop_ids: list[int]
    decoders: dict = field(default_factory=dict)  # (batch, length) -> fastdecode.Decoder: graphs recorded once


@dataclass
class Generation:
    texts: list[str]  # in the order of the prompts given
    new_tokens: int  # generated tokens, up to and including each row's stop token
    wall_s: float  # prefill and decoding of every batch; model loading and graph recording excluded
    path: str = "generate"  # "generate" (transformers, dynamic cache), "static+cuda-graphs" or "static" (CPU)
    batch_size: int = 0
    setup_s: float = 0.0  # one-time cost of the fast path for this model and length: recording its graphs
    # Prompts (indices) whose answer ran into max_new_tokens without a stop token: the MATH judge gives these no
    # last-number fallback (a cut-off repetition loop is not a solution; ISSUES_LOG B12).
    capped: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "prompts": len(self.texts), "capped": sorted(self.capped),
                "path": self.path,
                "batch_size": self.batch_size, "setup_s": round(self.setup_s, 3),
                "tokens_per_s_counts": "generated tokens through each answer's stop token (padding and the "
                                       "prompt not counted) per second of prefill + decoding"}


def load_model(name: str | Path, *, device: str = "auto") -> LoadedModel:
    """A model folder (or hub id) for inference: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
        model = AutoModelForCausalLM.from_pretrained(str(name), torch_dtype=dtype)
    except OSError as err:
        fix = "check the path; for a hub id, `huggingface-cli login` or HF_TOKEN, and the network"
        raise UserError(f"cannot load model '{name}': {str(err).splitlines()[0]}", where=str(name), fix=fix) from err
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model '{name}' has no chat template", where=str(name),
                        fix="validate an instruct model, or save its tokenizer with a chat_template")
    model.to(device).eval()
    # Decoder-only batches must be left-padded, or new tokens follow pad tokens in the shorter rows.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = end_of_turn_ids(model.generation_config, tokenizer)
    log.info("loaded %s on %s as %s; stop ids %s", name, device, str(dtype).replace("torch.", ""), stop_ids)
    return LoadedModel(str(name), model, tokenizer, device, str(dtype).replace("torch.", ""), stop_ids)


def end_of_turn_ids(generation_config, tokenizer) -> list[int]:
    """generation_config.eos_token_id (an int or a list) plus the tokenizer's eos, without duplicates."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def unload(loaded: LoadedModel) -> None:
    """Free the GPU before the next model loads (two 8B models at once need 32 GB)."""
    loaded.model = None
    _free_decoders(loaded)  # static caches and graphs: tens of GB at a large batch


def generate(loaded: LoadedModel, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             desc: str = "generate", fast: bool | None = None, fast_batch: int | None = None) -> Generation:
    """Greedy answers to `prompts`, in their order, with a progress bar; timing covers generation only.

    fast (default: on a GPU) decodes with fastdecode in batches of `fast_batch` rows (default: on a GPU as many as
    the free memory holds, on a CPU `batch_size`); the simple path uses `batch_size`. A loaded model keeps its
    caches and recorded graphs for the next call with the same length (the next task's prompts get new ones)."""
    tok = loaded.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # The chat template already starts with the BOS token: do not add a second one.
    ids = tok(chats, add_special_tokens=False)["input_ids"]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows on the first batch.
    order = sorted(range(len(chats)), key=lambda i: -len(ids[i]))
    fast = loaded.device.startswith("cuda") if fast is None else fast
    with _Progress(len(prompts), desc) as progress:
        if fast:
            on_gpu = loaded.device.startswith("cuda")
            return _generate_fast(loaded, ids, order, max_new_tokens, fast_batch or (None if on_gpu else batch_size),
                                  progress)
        return _generate_simple(loaded, ids, order, max_new_tokens, batch_size, progress)


def _generate_simple(loaded: LoadedModel, ids: list, order: list[int], max_new_tokens: int, batch_size: int,
                     progress: _Progress) -> Generation:
    import torch

    tok = loaded.tokenizer
    texts: list[str | None] = [None] * len(ids)
    new_tokens, wall, capped = 0, 0.0, []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        enc = {k: v.to(loaded.device) for k, v in enc.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=loaded.stop_ids,
                pad_token_id=tok.pad_token_id, streamer=progress.streamer(len(rows), loaded.stop_ids),
                # Instruct configs ship sampling defaults; unset them so greedy decoding does not warn.
                temperature=None, top_p=None, top_k=None,
            )
        wall += time.perf_counter() - t0  # .generate returns after the device finished (tokens are checked)
        for i, row in zip(rows, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
            n = tokens_until_stop(row, loaded.stop_ids)
            if _hit_cap(row[:n], max_new_tokens, loaded.stop_ids):
                capped.append(i)
            new_tokens += n
            texts[i] = tok.decode(row[:n], skip_special_tokens=True).strip()
    return Generation(texts=texts, new_tokens=new_tokens, wall_s=wall, path="generate", batch_size=batch_size,
                      capped=capped)


def _generate_fast(loaded: LoadedModel, ids: list, order: list[int], max_new_tokens: int, batch: int | None,
                   progress: _Progress) -> Generation:
    import torch

    from cogumi.evaluate import fastdecode, gqa_attention

    tok = loaded.tokenizer
    max_len = fastdecode.run_length([len(x) for x in ids], max_new_tokens)
    if not loaded.decoders:
        gqa_attention.install(loaded.model)  # before any graph is recorded: the graphs hold the grouped step
    if batch is None and not any(length == max_len for _, length in loaded.decoders):
        _free_decoders(loaded)  # another task's caches: the batch is sized from the memory they held too
    if batch is None:
        batch = next((b for b, length in loaded.decoders if length == max_len), None) or \
            fastdecode.batch_size_for_memory(loaded.model, max_len, len(ids[order[0]]), loaded.device, len(ids))
    batch = max(1, min(batch, len(ids)))
    decoder = loaded.decoders.setdefault((batch, max_len), fastdecode.Decoder(batch=batch, max_len=max_len))
    setup_before = decoder.capture_s
    log.info("fast decoding: batches of %d rows, cache of %d tokens", batch, max_len)
    texts: list[str | None] = [None] * len(ids)
    new_tokens, wall, capped = 0, 0.0, []
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        enc = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        t0, capture0 = time.perf_counter(), decoder.capture_s
        answers = fastdecode.decode_batch(loaded.model, decoder, enc["input_ids"].to(loaded.device),
                                          enc["attention_mask"].to(loaded.device), max_new_tokens, loaded.stop_ids,
                                          on_step=progress.step)
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0 - (decoder.capture_s - capture0)  # recording is setup, not decoding
        for i, answer in zip(rows, answers, strict=True):
            if _hit_cap(answer, max_new_tokens, loaded.stop_ids):
                capped.append(i)
            new_tokens += len(answer)
            texts[i] = tok.decode(answer, skip_special_tokens=True).strip()
    path = "static+cuda-graphs" if loaded.device.startswith("cuda") else "static"
    return Generation(texts=texts, new_tokens=new_tokens, wall_s=wall, path=path, batch_size=batch,
                      setup_s=decoder.capture_s - setup_before, capped=capped)


def full_run_batch(loaded: LoadedModel, ids: list, max_new_tokens: int, batch_size: int) -> tuple[int, int]:
    """(rows per batch, cache length) that generate() decodes `ids` with: on a GPU as many rows as the free memory
    holds at the run's cache length, on a CPU `batch_size`; never more than there are prompts."""
    from cogumi.evaluate import fastdecode

    max_len = fastdecode.run_length([len(x) for x in ids], max_new_tokens)
    if not loaded.device.startswith("cuda"):
        return max(1, min(batch_size, len(ids))), max_len
    longest = max(len(x) for x in ids)
    return max(1, min(len(ids), fastdecode.batch_size_for_memory(loaded.model, max_len, longest, loaded.device,
                                                                 len(ids)))), max_len


def decode_rate(loaded: LoadedModel, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                probe_tokens: int = 32, fast: bool | None = None) -> dict:
    """Tokens/s of one short batch at the size a full generate() over `prompts` decodes at (ISSUES_LOG B44): the
    first batch's rows (the longest prompts), `probe_tokens` tokens each with no row stopping early, in the run's
    cache length on a GPU. A rehearsal's few prompts decode at a batch of a few rows: 10x slower per token than a
    full run's batch of 160+ on an H200, so its tokens/s says nothing about the full run. `fast`: as generate()."""
    import torch

    from cogumi.evaluate import fastdecode, gqa_attention

    tok = loaded.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    ids = tok(chats, add_special_tokens=False)["input_ids"]
    batch, max_len = full_run_batch(loaded, ids, max_new_tokens, batch_size)
    rows = sorted(ids, key=len, reverse=True)[:batch]
    enc = tok.pad({"input_ids": rows}, return_tensors="pt")
    on_gpu = loaded.device.startswith("cuda")
    if on_gpu if fast is None else fast:
        if not loaded.decoders:
            gqa_attention.install(loaded.model)
        _free_decoders(loaded)
        decoder = loaded.decoders.setdefault((batch, max_len), fastdecode.Decoder(batch=batch, max_len=max_len))
        args = (enc["input_ids"].to(loaded.device), enc["attention_mask"].to(loaded.device))
        never = [-1]  # a stop id no token has: every row decodes all probe_tokens
        fastdecode.decode_batch(loaded.model, decoder, *args, 2, never)  # records the graph: setup, not decoding
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        answers = fastdecode.decode_batch(loaded.model, decoder, *args, probe_tokens, never)
        if on_gpu:
            torch.cuda.synchronize()
        new_tokens = sum(len(a) for a in answers)
    else:
        enc = {k: v.to(loaded.device) for k, v in enc.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(**enc, max_new_tokens=probe_tokens, min_new_tokens=probe_tokens,
                                        do_sample=False, eos_token_id=loaded.stop_ids, pad_token_id=tok.pad_token_id,
                                        temperature=None, top_p=None, top_k=None)
        new_tokens = int(out[:, enc["input_ids"].shape[1]:].numel())
    wall = time.perf_counter() - t0
    return {"batch": batch, "cache_len": max_len, "new_tokens": new_tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(new_tokens / wall, 2) if wall > 0 else 0.0, "prompts": len(prompts)}


def _free_decoders(loaded: LoadedModel) -> None:
    import gc

    import torch

    loaded.decoders.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Progress:
    """One bar per generate() call: finished prompts as each row stops, tokens generated so far beside it."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="prompt")
        self.tokens = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def step(self, live: int, finished: int) -> None:
        self.tokens += live + finished
        self.bar.set_postfix_str(f"{self.tokens} tokens", refresh=False)
        self.bar.update(finished)  # redraws at most every few tenths of a second

    def streamer(self, rows: int, stop_ids: list[int]) -> _StepStreamer:
        return _StepStreamer(self, rows, stop_ids)


class _StepStreamer:
    """transformers' streamer hook: put() gets the prompt once, then each step's new token of every row."""

    def __init__(self, progress: _Progress, rows: int, stop_ids: list[int]):
        self.progress, self.live, self.stops, self.prompt_seen = progress, [True] * rows, set(stop_ids), False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        finished = 0
        for row, token in enumerate(tokens):
            if self.live[row] and token in self.stops:
                self.live[row] = False
                finished += 1
        self.progress.step(sum(self.live), finished)

    def end(self) -> None:
        self.progress.step(0, sum(self.live))  # rows cut at max_new_tokens
        self.live = [False] * len(self.live)


def _hit_cap(answer: list[int], max_new_tokens: int, stop_ids: list[int]) -> bool:
    """The answer used every allowed token and did not end on a stop token: it was cut off."""
    return len(answer) >= max_new_tokens and (not answer or answer[-1] not in stop_ids)


def tokens_until_stop(ids: list[int], stop_ids: list[int]) -> int:
    """How many tokens a row really generated: through its first stop token; the rest is padding."""
    stops = set(stop_ids)
    for k, token in enumerate(ids):
        if token in stops:
            return k + 1
    return len(ids)
