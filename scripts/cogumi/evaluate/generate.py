"""Batched greedy generation through the model's own chat template, timed.

One prompt = one user message. Prompts are sorted by length so a batch pads little, left-padded so every row
ends where generation starts, and stopped at the end-of-turn ids the model's generation_config names
(Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>); stopping only at the tokenizer's eos runs every answer to
max_new_tokens on models whose chat turns end with another token.
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


@dataclass
class Generation:
    texts: list[str]  # in the order of the prompts given
    new_tokens: int  # generated tokens, up to and including each row's stop token
    wall_s: float
    # Prompts (indices) whose answer ran into max_new_tokens without a stop token: the MATH judge gives these no
    # last-number fallback (a cut-off repetition loop is not a solution; ISSUES_LOG B12).
    capped: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "prompts": len(self.texts), "capped": sorted(self.capped)}


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
    import gc

    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(loaded: LoadedModel, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             desc: str = "generate") -> Generation:
    """Greedy answers to `prompts`, in their order, with a progress bar; timing covers generation only."""
    import torch
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows on the first batch.
    lengths = [len(ids) for ids in tok(chats, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(chats)), key=lambda i: -lengths[i])
    texts: list[str | None] = [None] * len(chats)
    new_tokens = 0
    capped: list[int] = []
    wall = 0.0
    with tqdm(total=len(chats), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            # The chat template already starts with the BOS token: do not add a second one.
            enc = tok([chats[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(loaded.device) for k, v in enc.items()}
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = loaded.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=loaded.stop_ids,
                    pad_token_id=tok.pad_token_id,
                    # Instruct configs ship sampling defaults; unset them so greedy decoding does not warn.
                    temperature=None, top_p=None, top_k=None,
                )
            wall += time.perf_counter() - t0  # .generate returns after the device finished (tokens are checked)
            generated = out[:, enc["input_ids"].shape[1]:].tolist()
            for i, ids in zip(rows, generated, strict=True):
                n = _until_stop(ids, loaded.stop_ids)
                if n >= max_new_tokens and ids[n - 1] not in loaded.stop_ids:
                    capped.append(i)
                new_tokens += n
                texts[i] = tok.decode(ids[:n], skip_special_tokens=True).strip()
            bar.update(len(rows))
    return Generation(texts=texts, new_tokens=new_tokens, wall_s=wall, capped=capped)


def _until_stop(ids: list[int], stop_ids: list[int]) -> int:
    """How many tokens a row really generated: through its first stop token; the rest is padding."""
    stops = set(stop_ids)
    for k, token in enumerate(ids):
        if token in stops:
            return k + 1
    return len(ids)
