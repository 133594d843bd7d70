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

SWIGLU_BLOCK = 1024  # elements per program: an elementwise kernel, bound by memory bandwidth
SWIGLU_WARPS = 4


@functools.cache
def swiglu_kernels():
    """(forward, backward) Triton kernels of out = silu(gate) * up, in float32 inside, one rounding on store."""
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
        # int64 offsets: a micro-batch of 16k tokens x 14336 is past 2**31 elements in the backward's buffers
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_backward_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n_elements,
                               BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        # d silu(g) / dg = sig + silu * (1 - sig)
        tl.store(grad_gate_ptr + offsets, (grad * up * (sig + silu * (1.0 - sig))).to(grad_gate_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(grad_up_ptr + offsets, (grad * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)

    return swiglu_forward_kernel, swiglu_backward_kernel


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

    apply.per_row = True
    return apply
