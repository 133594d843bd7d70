"""The fast training path: fused kernels patched into model classes by the caller that wants them, then undone.

    with fast_path(train.liger, device.type) as applied:   # before the model is built: Liger patches classes
        ...build the model, train...

What it changes, each piece measured in docs/PERFORMANCE.md ("Training speed on the GPU"):

- Fused Triton kernels (CUDA only, when `liger_kernel` imports; switch `train.liger`): Liger's RMSNorm and RoPE,
  and our SwiGLU (cogumi.train.kernels: Liger 0.3.1's does not compile with the lock's triton 2.3.1, ISSUES_LOG B39).
  Liger's RoPE runs through `kernels.per_row_rope`: alone it gives every row of a micro-batch row 0's positions
  (ISSUES_LOG B38). The three patches are undone with the others.
- Fused LoRA linear (any device): peft's `lora.Linear.forward` computes, per layer, a float32 copy of the input
  (peft keeps adapters in float32), a float32 product, a float32 scaled copy and a float32 sum cast back to bf16, and
  saves the float32 input copy for backward. The fused version runs `y = x W^T + s (x A^T) B^T` as one autograd
  function in the activation dtype (adapters stay float32 master weights; their gradients come back in float32),
  adds the LoRA term in place, and saves only the bf16 input (shared with the other projections of the same input)
  and the rank-r product. Used only where it is exactly the same function: one active adapter, no dropout, no DoRA,
  not merged, frozen base weight. Anything else falls back to peft's own forward.
- Chunked linear + cross-entropy (any device): `LlamaForCausalLM.forward` with labels computes the loss and the
  gradient of the hidden states chunk by chunk (fp32 softmax), so the (tokens x vocab) logits are never held whole.
  Chunks of ~512 rows keep the LM-head products large enough to run at the matmul rate (Liger 0.3.1's fused
  version uses 64-row chunks for a 128k vocabulary: the 1 GB head weight is re-read 32 times per 2k tokens).
  When lm_head is not a plain nn.Linear (a LoRA target, modules_to_save) the original forward runs instead.

Checkpointing and the memory probe live in cogumi.train.probe, the FLOP count in cogumi.train.flops, attention for
packed rows in cogumi.train.packed_attention.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_STATE = {"fused_lora": False, "chunked_loss": False, "liger": False}
_LIGER_ORIGINALS: dict = {}  # what the Triton kernels replaced in modeling_llama, put back by remove_fast_path
CE_CHUNK_ELEMENTS = 512 * 131072  # rows x vocab per loss chunk (fp32: 256 MiB), about 512 rows for Llama 3


def _truthy(value) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"auto", ""}:
        return None
    if text in {"1", "true", "on", "yes"}:
        return True
    if text in {"0", "false", "off", "no"}:
        return False
    raise ValueError(f"expected auto/on/off, got {value!r}")


def liger_available() -> str | None:
    """liger_kernel's version when it imports (it needs Triton and a CUDA device to run), else None."""
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def apply_fast_path(liger: str, device_type: str, *, fused_lora: bool = True, chunked_loss: bool = True,
                    liger_loss: bool = False) -> dict:
    """Patch model classes for the fast path when asked and possible; returns what was applied.

    Called by the trainer and the benchmark before the model is instantiated (Liger patches classes).
    `liger`: auto (on where liger_kernel imports and the device is CUDA), on (required), off.
    `fused_lora` and `chunked_loss` are plain PyTorch and run on any device. `liger_loss` swaps the chunked loss
    for Liger's fused linear cross-entropy (kept to measure against; slower for the Llama-3 vocabulary).
    """
    want = _truthy(liger)
    version = liger_available()
    on_gpu = device_type == "cuda"
    use_liger = bool(version) and on_gpu if want is None else want
    if want and not (version and on_gpu):
        from cogumi.core.errors import UserError

        raise UserError("train.liger is on but Liger kernels cannot run here",
                        where=f"device {device_type}, liger_kernel {version or 'not installed'}",
                        fix="use train.liger=auto (off where unavailable) or install liger-kernel on a CUDA host")
    applied = {"liger": False, "liger_version": version, "fused_lora": False, "chunked_loss": False,
               "liger_loss": False}
    if use_liger:
        _patch_triton_kernels(liger_loss=bool(liger_loss))
        applied["liger"] = True
        applied["kernels"] = list(TRITON_PIECES)
        applied["liger_loss"] = bool(liger_loss)
    if fused_lora:
        _patch_peft_lora()
        applied["fused_lora"] = True
    if chunked_loss and not applied["liger_loss"]:
        _patch_causal_lm_loss()
        applied["chunked_loss"] = True
    log.info("fast path: %s", applied)
    return applied


def remove_fast_path() -> None:
    """Undo every patch of apply_fast_path: fused LoRA, chunked loss, and the Triton kernels in modeling_llama.

    (Liger's fused linear cross-entropy, kept only to measure against, is not undone: use a subprocess.)
    """
    if _STATE["liger"]:
        from transformers.models.llama import modeling_llama

        for name, original in _LIGER_ORIGINALS.items():
            if name == "LlamaMLP.forward":
                modeling_llama.LlamaMLP.forward = original
            else:
                setattr(modeling_llama, name, original)
        _LIGER_ORIGINALS.clear()
        _STATE["liger"] = False
    if _STATE["fused_lora"]:
        from peft.tuners.lora import layer as lora_layer

        lora_layer.Linear.forward = lora_layer.Linear.forward.__wrapped__
        _STATE["fused_lora"] = False
    if _STATE["chunked_loss"]:
        from transformers.models.llama import modeling_llama

        cls = modeling_llama.LlamaForCausalLM
        cls.forward = cls.forward.__wrapped__
        _STATE["chunked_loss"] = False


@contextmanager
def fast_path(liger: str, device_type: str, **switches) -> Iterator[dict]:
    """apply_fast_path for the block, remove_fast_path after it (also on an error); yields what was applied."""
    applied = apply_fast_path(liger, device_type, **switches)
    try:
        yield applied
    finally:
        remove_fast_path()


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels in modeling_llama

TRITON_PIECES = ("rms_norm", "rope", "swiglu")  # what train.liger turns on; each has a self-test (selftest.py)


def _patch_triton_kernels(*, liger_loss: bool) -> None:
    """Liger's RMSNorm, Liger's RoPE made right per row, our SwiGLU; the originals kept for remove_fast_path."""
    if _STATE["liger"]:
        return
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    from cogumi.train.kernels import per_row_rope, swiglu

    mlp_forward = modeling_llama.LlamaMLP.forward
    _LIGER_ORIGINALS.update({"LlamaRMSNorm": modeling_llama.LlamaRMSNorm,
                             "apply_rotary_pos_emb": modeling_llama.apply_rotary_pos_emb,
                             "LlamaMLP.forward": mlp_forward})

    def forward(self, x):
        if x.device.type != "cuda" or self.config.pretraining_tp > 1 or self.config.hidden_act not in ("silu", "swish"):
            return mlp_forward(self, x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    modeling_llama.LlamaRMSNorm = LigerRMSNorm  # a class swap: models built inside the block get Liger's module
    modeling_llama.apply_rotary_pos_emb = per_row_rope(liger_rotary_pos_emb)
    modeling_llama.LlamaMLP.forward = forward
    _STATE["liger"] = True
    if liger_loss:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


# ---------------------------------------------------------------------------------------------------------------
# Fused LoRA linear


class _LoraLinearFn:
    """Namespace for the autograd function (built lazily so importing this module needs no torch)."""

    fn = None


def _lora_fn():
    if _LoraLinearFn.fn is not None:
        return _LoraLinearFn.fn
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.autograd.Function):
        """y = x W^T + b + s (x A^T) B^T with W, b frozen; A, B (any float dtype) get gradients in their dtype."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
            dtype = x.dtype
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            a = lora_a.to(dtype)
            b_scaled = (lora_b * scaling).to(dtype)
            xa = x2 @ a.t()  # (T, r)
            y = F.linear(x2, weight, bias)
            y.addmm_(xa, b_scaled.t())
            ctx.save_for_backward(x2, weight, a, b_scaled, xa)
            ctx.scaling = scaling
            ctx.shape = shape
            ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad_out):
            x2, weight, a, b_scaled, xa = ctx.saved_tensors
            dy = grad_out.reshape(-1, grad_out.shape[-1])
            if dy.dtype != x2.dtype:
                dy = dy.to(x2.dtype)
            dyb = dy @ b_scaled  # (T, r) = s * dy B
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = dy @ weight
                grad_x.addmm_(dyb, a)
                grad_x = grad_x.view(ctx.shape)
            grad_a = grad_b = None
            if ctx.needs_input_grad[3]:
                grad_a = (dyb.t() @ x2).to(ctx.param_dtypes[0])
            if ctx.needs_input_grad[4]:
                grad_b = (dy.t() @ xa).to(ctx.param_dtypes[1]) * ctx.scaling
            return grad_x, None, None, grad_a, grad_b, None

    _LoraLinearFn.fn = LoraLinear
    return LoraLinear


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float):
    """The fused LoRA linear as a function (also used by tests against the plain formula)."""
    return _lora_fn().apply(x, weight, bias, lora_a, lora_b, scaling)


def fusable(layer, x, args, kwargs) -> str | None:
    """The active adapter name when this peft lora.Linear call can take the fused path, else None."""
    import torch.nn as nn

    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = layer.get_base_layer()
    if type(base) is not nn.Linear or base.weight.requires_grad or getattr(layer, "fan_in_fan_out", False):
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if layer.use_dora.get(name, False) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    if not x.dtype.is_floating_point or x.dtype != base.weight.dtype:
        return None
    return name


def _patch_peft_lora() -> None:
    if _STATE["fused_lora"]:
        return
    from peft.tuners.lora import layer as lora_layer

    original = lora_layer.Linear.forward

    def forward(self, x, *args, **kwargs):
        name = fusable(self, x, args, kwargs)
        if name is None:
            return original(self, x, *args, **kwargs)
        base = self.get_base_layer()
        return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           float(self.scaling[name]))

    forward.__wrapped__ = original
    lora_layer.Linear.forward = forward
    _STATE["fused_lora"] = True


# ---------------------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy


def _ce_fn():
    import torch

    class ChunkedLinearCE(torch.autograd.Function):
        """Mean cross-entropy of (hidden @ weight^T) against labels, computed chunk by chunk.

        The gradient with respect to the hidden states (and the weight, if it needs one) is computed in the
        forward pass, one chunk at a time, so no (tokens x vocab) tensor outlives its chunk.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
            n_valid = (labels != ignore_index).sum()
            denom = n_valid.clamp(min=1).to(torch.float32)
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows]
                lab = labels[start:start + chunk_rows]
                logits = (h @ weight.t()).float()
                valid = lab != ignore_index
                target = torch.where(valid, lab, torch.zeros_like(lab))
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                # d loss / d logits = (softmax - onehot) * valid / n_valid, built in place over the logits
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, target[:, None], -valid[:, None].to(probs.dtype))
                probs.mul_((valid.to(probs.dtype) / denom)[:, None])
                g = probs.to(weight.dtype)
                del logits, probs
                grad_h[start:start + chunk_rows] = g @ weight
                if grad_w is not None:
                    grad_w.addmm_(g.t().float(), h.float())
            ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
            ctx.has_grad_w = grad_w is not None
            ctx.weight_dtype = weight.dtype
            return total / denom

        @staticmethod
        def backward(ctx, grad_loss):
            grad_h, grad_w = ctx.saved_tensors
            gh = grad_h * grad_loss.to(grad_h.dtype)
            gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_grad_w else None
            return gh, gw, None, None, None

    return ChunkedLinearCE


_CE = {"fn": None}


def chunked_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, chunk_rows: int | None = None):
    """Mean CE over tokens of `hidden (T, H) @ weight (V, H)^T` against `labels (T,)`, without full logits."""
    if _CE["fn"] is None:
        _CE["fn"] = _ce_fn()
    if chunk_rows is None:
        chunk_rows = max(16, CE_CHUNK_ELEMENTS // max(1, weight.shape[0]))
    return _CE["fn"].apply(hidden, weight, labels, ignore_index, int(chunk_rows))


def _patch_causal_lm_loss() -> None:
    if _STATE["chunked_loss"]:
        return
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaForCausalLM
    original = cls.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, **kwargs):
        # The chunked loss multiplies by lm_head.weight itself, so it is only the same function when lm_head is a
        # plain nn.Linear: a LoRA (or modules_to_save) wrapper on lm_head would be silently skipped.
        if labels is None or kwargs or getattr(self.config, "pretraining_tp", 1) > 1 or \
                type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, return_dict=return_dict,
                            cache_position=cache_position, **kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=True, cache_position=cache_position)
        hidden = outputs[0]
        # Shift the labels rather than the hidden states: a view of the hidden states, no copy.
        shifted = F.pad(labels[..., 1:], (0, 1), value=-100).to(hidden.device)
        loss = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                            shifted.reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    forward.__wrapped__ = original
    cls.forward = forward
    _STATE["chunked_loss"] = True
