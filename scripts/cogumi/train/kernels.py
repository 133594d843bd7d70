"""The fast path's own Triton kernel (SwiGLU) and the RoPE wrapper that keeps any RoPE kernel right per row.

Why our own SwiGLU (ISSUES_LOG B39): liger-kernel 0.3.1's SwiGLU kernel calls `tensor.cast`, which the lock's
triton 2.3.1 (the one torch 2.3.1 pins) does not have, so `make train` died at its first step on the pinned stack.
This kernel does the same work (one pass forward, one pass backward, silu recomputed instead of saved) with only
the Triton API that 2.3 and 3.x share; tests/test_kernels_aot.py compiles it for sm_80 and sm_90 with the lock's
triton, and tests/gpu/ checks it against the plain module on the GPU.

Why the RoPE wrapper (ISSUES_LOG B38): Liger 0.3.1's RoPE kernel reads the cos/sin of row 0 for every row of the
micro-batch. Packed rows restart their positions at every example, so each row has its own positions, and rows 1..n
got row 0's rotation. Given one row of all the micro-batch's tokens, the kernel's single cos/sin row is every
token's own: `per_row_rope` flattens (B, H, L, D) to (1, H, B*L, D) before calling the kernel (free for the
layouts the attention produces) and restores the shape after.

Importing this module needs no Triton; the kernels are built on first use (CUDA only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SWIGLU_BLOCK = 1024  # elements per program: an elementwise kernel, bound by memory bandwidth
SWIGLU_WARPS = 4


def swiglu_kernels():
    """(forward, backward) Triton kernels of out = silu(gate) * up (cogumi.train.swiglu_triton imports Triton)."""
    from cogumi.train import swiglu_triton

    return swiglu_triton.swiglu_forward_kernel, swiglu_triton.swiglu_backward_kernel


@functools.cache
def _swiglu_function():
    import torch
    import triton

    forward_kernel, backward_kernel = swiglu_kernels()

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up; saves gate and up (not the product) and recomputes silu in backward."""

        @staticmethod
        def forward(ctx, gate, up):
            gate, up = gate.contiguous(), up.contiguous()
            out = torch.empty_like(gate)
            n = gate.numel()
            forward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=SWIGLU_BLOCK,
                                                           num_warps=SWIGLU_WARPS)
            ctx.save_for_backward(gate, up)
            return out

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            grad = grad.contiguous()
            grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
            n = gate.numel()
            backward_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](grad, gate, up, grad_gate, grad_up, n,
                                                            BLOCK=SWIGLU_BLOCK, num_warps=SWIGLU_WARPS)
            return grad_gate, grad_up

    return SwiGLU


def swiglu(gate, up):
    """silu(gate) * up through the Triton kernels (CUDA tensors of one dtype and shape)."""
    return _swiglu_function().apply(gate, up)


def per_row_rope(rope):
    """`rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)` made right for cos/sin that differ per row.

    A kernel that reads only row 0's cos/sin (Liger 0.3.1) is given one row of B*L tokens instead of B rows of L.
    """

    @functools.wraps(rope)
    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if cos.dim() != 3 or cos.shape[0] == 1 or unsqueeze_dim != 1:
            return rope(q, k, cos, sin, position_ids, unsqueeze_dim)
        bsz, _, length, dim = q.shape

        def one_row(t):  # (B, n, L, D) -> (1, n, B*L, D)
            return t.transpose(1, 2).reshape(1, bsz * length, t.shape[1], dim).transpose(1, 2)

        def rows(t):  # (1, n, B*L, D) -> (B, n, L, D)
            return t.transpose(1, 2).reshape(bsz, length, t.shape[1], dim).transpose(1, 2)

        q1, k1 = rope(one_row(q), one_row(k), cos.reshape(1, -1, cos.shape[-1]), sin.reshape(1, -1, sin.shape[-1]),
                      None, unsqueeze_dim)
        return rows(q1), rows(k1)

    return apply


# ------------------------------------------------------------------ every Triton launch of the fast path


@dataclass(frozen=True)
class Launch:
    """One Triton kernel as the fast path launches it at one model shape: its parameters in order, each either a
    Triton type string (`*bf16`, `i32`, `fp32`) or, for a constexpr parameter, its value. Read by
    tests/test_kernels_aot.py, which compiles each for sm_80 and sm_90 with the lock's triton and no GPU."""

    name: str
    fn: object
    params: tuple
    num_warps: int


def triton_launches(hidden: int = 4096, intermediate: int = 14336, heads: int = 32, kv_heads: int = 8,
                    head_dim: int = 128, dtype: str = "bf16") -> list[Launch]:
    """The Triton kernels train.liger turns on (fastpath.TRITON_PIECES), as launched for a Llama of this shape."""
    import triton
    from liger_kernel.ops.rms_norm import _rms_norm_backward_kernel, _rms_norm_forward_kernel
    from liger_kernel.ops.rope import _triton_rope
    from liger_kernel.ops.utils import calculate_settings

    ptr, f32 = f"*{dtype}", "*fp32"
    norm_block, norm_warps = calculate_settings(hidden)
    llama_casting = 0  # Liger's casting mode "llama", LigerRMSNorm's default
    rms_forward = (ptr, "i32", ptr, "i32", ptr, "i32", f32, "i32", "i32", "fp32", "fp32", llama_casting, norm_block)
    rms_backward = (ptr, "i32", ptr, "i32", ptr, "i32", f32, "i32", ptr, "i32", "i32", "fp32", llama_casting,
                    norm_block)
    pad_q, pad_kv, pad_d = (triton.next_power_of_2(n) for n in (heads, kv_heads, head_dim))
    # bs = 1: packed rows reach RoPE as one row (per_row_rope / packed_attention), unpacked rows share positions
    rope = (ptr, "i32", ptr, "i32", ptr, "i32", ptr, "i32", "i32", 1, heads, kv_heads, head_dim, pad_q, pad_kv, pad_d,
            max(pad_q, pad_kv))
    swiglu_forward, swiglu_backward = swiglu_kernels()
    return [
        Launch("rms_norm forward", _rms_norm_forward_kernel, rms_forward, norm_warps),
        Launch("rms_norm backward", _rms_norm_backward_kernel, rms_backward, norm_warps),
        Launch("rope forward", _triton_rope, (*rope, False), 4),
        Launch("rope backward", _triton_rope, (*rope, True), 4),
        Launch("swiglu forward", swiglu_forward, (ptr, ptr, ptr, "i32", SWIGLU_BLOCK), SWIGLU_WARPS),
        Launch("swiglu backward", swiglu_backward, (ptr, ptr, ptr, ptr, ptr, "i32", SWIGLU_BLOCK), SWIGLU_WARPS),
    ]
