"""SwiGLU as two Triton kernels: out = silu(gate) * up, and its backward with silu recomputed (nothing extra saved).

Float32 inside, one rounding on store. Only the Triton API that 2.3 (the lock's) and 3.x share: `.to(tl.int64)`,
not `.cast` (ISSUES_LOG B39). Triton reads a kernel's globals, so this module imports it at the top; everything
else reaches it through cogumi.train.kernels, on first use.
"""

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
