"""The pinned GPU stack checked without a GPU: every Triton kernel the fast path can launch compiles ahead of time
for sm_80 (A100) and sm_90 (H100/H200) with the lock's triton, to a cubin, at Llama-3.1-8B shapes; and the torch
ops the packed attention calls accept our arguments in the lock's torch (ISSUES_LOG B39, B40).

What stays unchecked here: running the kernels (tests/gpu/, `make test-gpu`, on a GPU), flash-attn 2.5.8 (its
wheel needs a CUDA host), and the lock's torch + triton on a GPU at all (the device image has torch 2.11).
"""

from __future__ import annotations

import re

import pytest
import torch

from cogumi.core.paths import REPO_ROOT
from cogumi.train.kernels import triton_launches

triton = pytest.importorskip("triton")
pytest.importorskip("liger_kernel")
ARCHS = (80, 90)


def locked(name: str) -> str:
    text = (REPO_ROOT / "requirements" / "gpu.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)", text, re.M).group(1)


def compile_for(fn, params: tuple, num_warps: int, capability: int) -> bytes:
    """triton 2.3's compile pipeline (source -> ttir -> ttgir -> llir -> ptx -> cubin through ptxas) for a target
    given by hand, stopping before the launcher stub (which needs a driver)."""
    from triton.compiler.backends.cuda import CUDABackend
    from triton.compiler.compiler import ASTSource

    signature = {i: p for i, p in enumerate(params) if isinstance(p, str)}
    constants = {i: p for i, p in enumerate(params) if not isinstance(p, str)}
    source = ASTSource(fn=fn, signature=signature, constants=constants)
    backend = CUDABackend(("cuda", capability))
    options = backend.parse_options({"num_warps": num_warps})
    stages: dict = {}
    backend.add_stages(stages, options)
    metadata = {"target": ("cuda", capability), **options.__dict__}
    module = source.make_ir(options)
    for step in stages.values():
        module = step(module, metadata)
    return module


def test_the_installed_stack_is_the_gpu_lock():
    import importlib.metadata as md

    assert triton.__version__ == locked("triton")
    assert torch.__version__.split("+")[0] == locked("torch")
    assert md.version("liger-kernel") == locked("liger-kernel")


def test_every_triton_kernel_of_the_fast_path_is_listed():
    """The list the compile test walks is the fast path's own: every jit function of the Liger modules it patches
    in, and ours, appears in it (a kernel added to the path without a launch entry would go unchecked)."""
    from liger_kernel.ops import rms_norm, rope

    from cogumi.train.fastpath import TRITON_PIECES
    from cogumi.train.kernels import swiglu_kernels

    listed = {launch.fn for launch in triton_launches()}
    used = {obj for module in (rms_norm, rope) for obj in vars(module).values()
            if isinstance(obj, triton.runtime.JITFunction)}
    used |= set(swiglu_kernels())
    assert used and used <= listed, sorted(getattr(f, "__name__", str(f)) for f in used - listed)
    assert {launch.name.split()[0] for launch in triton_launches()} == set(TRITON_PIECES)


@pytest.mark.parametrize("capability", ARCHS)
@pytest.mark.parametrize("launch", triton_launches(), ids=lambda launch: launch.name.replace(" ", "_"))
def test_kernel_compiles_ahead_of_time_with_the_lock_triton(launch, capability):
    cubin = compile_for(launch.fn, launch.params, launch.num_warps, capability)
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF"  # a real cubin from ptxas


def test_liger_swiglu_does_not_compile_with_the_lock_triton():
    """Why the fast path has its own SwiGLU: Liger 0.3.1's kernel calls tensor.cast, which triton 2.3.1 lacks. If a
    new lock makes this compile, Liger's kernel could come back (and this test says so)."""
    from liger_kernel.ops.swiglu import _swiglu_forward_kernel
    from triton.compiler.errors import CompilationError

    with pytest.raises(CompilationError, match="cast"):
        compile_for(_swiglu_forward_kernel, ("*bf16", "*bf16", "*bf16", "i32", 14336, 16384), 16, 90)


def test_the_lock_torch_has_the_varlen_attention_the_packed_path_calls():
    """aten._flash_attention_forward: our call binds to the lock's schema (the meta dispatch fails only for want of
    a meta kernel, after argument parsing), a CUDA kernel and an autograd formula are registered, and the build
    targets sm_80 and sm_90."""
    from cogumi.train import packed_attention
    from cogumi.train.packed_attention import attend, segment_bounds

    name = "aten::_flash_attention_forward"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    assert {"sm_80", "sm_90"} <= set(torch._C._cuda_getArchFlags().split())
    positions = torch.cat([torch.arange(40), torch.arange(24)]).repeat(2, 1)
    cu, longest = segment_bounds(positions)
    meta = positions.to("meta")
    setattr(meta, packed_attention.BOUNDS_ATTRIBUTE, (cu.to("meta"), longest))
    q = torch.empty(2, 32, 64, 128, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 8, 64, 128, device="meta", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="Meta"):
        attend("aten_flash_varlen", q, kv, kv, meta)
    with pytest.raises(RuntimeError, match="argument"):  # the same call with an argument too many does not bind
        torch.ops.aten._flash_attention_forward(q, kv, kv, cu, cu, longest, longest, 0.0, True, False, 1)
