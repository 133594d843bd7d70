"""Attention for packed rows: every example attends to its own earlier tokens only, with no L x L mask.

A packed row holds several whole examples; the collator restarts `position_ids` at 0 for each. transformers 4.43.3
ignores position_ids for attention (its flash-attn varlen packing arrived in 4.44; sdpa only takes a dense mask),
so packed runs swap in this module's attention on the model's own layers, visibly and undone at the end:

    with packed_attention(model, kernel):   # kernel from choose_kernel(device, dtype)
        ...train...

The segment boundaries (cumulative sequence lengths) come from the host copy of position_ids (`batch_to_device`),
shared by every layer and by the recompute of checkpointed layers. Kernels, fastest first (docs/PERFORMANCE.md,
"Real lengths: packed rows against padded micro-batches", where they are measured against each other):

- flash_attn_varlen: flash-attn's `flash_attn_varlen_func` when flash_attn imports (GPU hosts after `make setup`).
- aten_flash_varlen: the flash-attention kernel PyTorch itself ships, `torch.ops.aten._flash_attention_forward`
  with cumulative sequence lengths (CUDA, bf16/fp16; the same kernel sdpa picks for full causal rows; it has an
  autograd formula on torch 2.3.1 and on 2.11). Grouped-query attention runs without repeating K and V.
- sdpa_block_mask: the fallback anywhere else (CPU, fp32): sdpa with a boolean block-diagonal causal mask built on
  the device from the position_ids (never shipped from the CPU per micro-batch).

A packed batch given to a model without this attention would silently attend across examples (transformers sees
no mask and runs plain causal attention), so the trainer and the probe call `require_packed_attention` first.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)

KERNELS = ("flash_attn_varlen", "aten_flash_varlen", "sdpa_block_mask")
_MARK = "_cogumi_packed_kernel"
BOUNDS_ATTRIBUTE = "_cogumi_segment_bounds"  # segment bounds ride on position_ids (batch_to_device)


def usable_kernels(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The packed-attention kernels that can run on this device and dtype, fastest first."""
    usable = {"sdpa_block_mask"}
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if hasattr(torch.ops.aten, "_flash_attention_forward"):
            usable.add("aten_flash_varlen")
        if importlib.util.find_spec("flash_attn") is not None:
            usable.add("flash_attn_varlen")
    return [k for k in KERNELS if k in usable]


def choose_kernel(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The fastest exact kernel for packed rows on this device and dtype (or `requested`, checked)."""
    usable = usable_kernels(device, dtype)
    if requested == "auto":
        return usable[0]
    if requested not in usable:
        raise UserError(f"packed attention kernel '{requested}' cannot run on {device.type} in "
                        f"{str(dtype).replace('torch.', '')}", where="packed attention kernel",
                        fix=f"use auto, or one of {sorted(usable)}")
    return requested


def segment_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative sequence lengths as int32 on the device, longest segment) of a (batch, L) position_ids.

    A segment starts where the position is 0 and at the start of every row. Reads a device tensor back to the host
    (a sync): batch_to_device computes them from the host copy instead.
    """
    positions = position_ids.detach().to("cpu").reshape(position_ids.shape[0], -1)
    starts = positions == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([flat, torch.tensor([starts.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return cu.to(position_ids.device), longest


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; packed rows' segment bounds are computed from the host copy of position_ids
    and ride along on the device tensor, so the attention never waits for the GPU to read them back (a read-back per
    forward drained the launch queue and cost ~10 % of the packed throughput on the H200, docs/PERFORMANCE.md)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "position_ids" in batch:
        cu, longest = segment_bounds(batch["position_ids"])
        setattr(moved["position_ids"], BOUNDS_ATTRIBUTE, (cu.to(device, non_blocking=True), longest))
    return moved


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean mask on position_ids' device: True where a token may attend (own example, earlier)."""
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def attend(kernel: str, q, k, v, position_ids, cache: dict | None = None):
    """Causal attention within each packed example: q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, L, H * D).

    `cache` keeps the segment bounds of one position_ids tensor across the layers of a forward (and the recompute
    of checkpointed layers, which passes the same tensor again).
    """
    bsz, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    scale = dim ** -0.5
    if kernel == "sdpa_block_mask":
        if kv_heads != heads:  # sdpa on torch 2.3 has no grouped-query attention: repeat K and V
            k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        # On the CPU, torch's fused sdpa kernel returns NaN for a query whose only allowed key is itself at some
        # tile offsets (an example's first token in row 2+ of a micro-batch, ISSUES_LOG B41): the math kernel is exact.
        with sdpa_kernel(SDPBackend.MATH) if q.device.type == "cpu" else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(position_ids), scale=scale)
        return out.transpose(1, 2).reshape(bsz, length, heads * dim)
    cache = {} if cache is None else cache
    if cache.get("key") is not position_ids:
        bounds = getattr(position_ids, BOUNDS_ATTRIBUTE, None)  # set by batch_to_device: no read back from the GPU
        cache.update(key=position_ids, bounds=bounds or segment_bounds(position_ids))
    cu, longest = cache["bounds"]

    def flat(t, n):  # (B, n, L, D) -> (B * L, n, D): the varlen kernels' layout
        return t.transpose(1, 2).reshape(bsz * length, n, dim)

    q, k, v = flat(q, heads), flat(k, kv_heads), flat(v, kv_heads)
    if kernel == "flash_attn_varlen":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=0.0, softmax_scale=scale,
                                     causal=True)
    else:  # aten_flash_varlen; its autograd formula is PyTorch's own (_flash_attention_backward)
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False,
                                                      scale=scale)[0]
    return out.reshape(bsz, length, heads * dim)


def _packed_forward(kernel: str, cache: dict):
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        # The segments come from position_ids alone. A mask, if any, is the plain causal one that eager attention
        # builds (packed batches carry none) or a right-padding one, which the segments already imply.
        if position_ids is None or past_key_value is not None or output_attentions:
            raise RuntimeError("packed attention is for training on packed rows (position_ids, no KV cache, no "
                               "attention weights): pass use_cache=False")
        bsz, length, _ = hidden_states.shape
        heads, kv_heads, dim = self.num_heads, self.num_key_value_heads, self.head_dim
        # The micro-batch as ONE row of bsz * length tokens, each with its own cos/sin: whatever RoPE is active
        # (Liger's kernel reads row 0's cos/sin for every row, ISSUES_LOG B38), and the varlen kernels want this
        # layout anyway, so the reshapes are views.
        q = self.q_proj(hidden_states).view(1, bsz * length, heads, dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(1, bsz * length, kv_heads, dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, length, kv_heads, dim).transpose(1, 2)
        cos, sin = position_embeddings if position_embeddings is not None else self.rotary_emb(v, position_ids)
        # Looked up at call time: the fast path replaces modeling_llama.apply_rotary_pos_emb with a fused kernel.
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos.reshape(1, -1, dim), sin.reshape(1, -1, dim))

        def rows(t, n):  # (1, n, bsz * length, D) -> (bsz, n, length, D)
            return t.transpose(1, 2).reshape(bsz, length, n, dim).transpose(1, 2)

        return self.o_proj(attend(kernel, rows(q, heads), rows(k, kv_heads), v, position_ids, cache)), None, None

    return forward


def _attention_modules(model) -> list:
    from cogumi.train.probe import decoder_of

    modules = [layer.self_attn for layer in decoder_of(model).layers]
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "num_key_value_heads", "head_dim")
    if not modules or not all(all(hasattr(m, a) for a in needed) for m in modules):
        raise UserError(f"packed rows need Llama-style attention layers; {type(model).__name__} has others",
                        where="data.packing", fix="set data.packing=false for this model")
    return modules


@contextmanager
def packed_attention(model, kernel: str):
    """Within the block, `model`'s attention layers take packed rows with `kernel`; restored on exit."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown packed attention kernel {kernel!r}; known: {KERNELS}")
    modules = _attention_modules(model)
    cache: dict = {}  # segment bounds of the current position_ids, shared by every layer
    forward = _packed_forward(kernel, cache)
    for module in modules:
        module.forward = types.MethodType(forward, module)  # this model's instances only, not the class
    setattr(model, _MARK, kernel)
    log.info("attention: packed rows through %s", kernel)
    try:
        yield kernel
    finally:
        for module in modules:
            del module.forward
        delattr(model, _MARK)
        cache.clear()


def packed_kernel_of(model) -> str | None:
    """The packed attention kernel active on `model`, or None."""
    return getattr(model, _MARK, None)


def require_packed_attention(model) -> str:
    """Refuse packed rows on a model whose attention would let examples see each other."""
    kernel = packed_kernel_of(model)
    if kernel is None:
        raise RuntimeError("packed rows given to a model without packed attention: examples would attend across "
                           "their boundaries (use cogumi.train.packed_attention.packed_attention)")
    return kernel
