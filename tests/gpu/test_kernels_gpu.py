"""Each fast-path kernel against the plain formula on the GPU at Llama-3.1-8B layer shapes (hidden 4096, 32 heads,
8 KV heads, head_dim 128, intermediate 14336, vocab 128,256), bf16, rows with their own positions and boundaries,
tolerance NOISE_FACTOR x the measured bf16 noise floor (cogumi.train.selftest)."""

from __future__ import annotations

import pytest
import torch

from cogumi.train import selftest
from cogumi.train.fastpath import fast_path
from cogumi.train.packed_attention import usable_kernels

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def _ok(check, record):
    record(name=check.name, error=check.error, noise=check.noise, allowed=check.allowed, passed=check.passed,
           ratio=check.error / max(check.noise, selftest.BF16_ROUNDING), detail=check.detail)
    assert check.passed, check.line()


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_rope_is_right_per_row(rows, record):
    with fast_path("on", "cuda") as applied:
        assert "rope" in applied["kernels"]
        _ok(selftest.check_rope(CUDA, BF16, rows=rows, length=512, heads=32, kv_heads=8), record)


def test_liger_rope_alone_gives_every_row_row_0s_positions(record, monkeypatch):
    """The defect the wrapper exists for (ISSUES_LOG B38), measured: Liger 0.3.1's kernel as the code before the fix
    installed it fails the same check on rows 2+, and passes with one row."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    one = selftest.check_rope(CUDA, BF16, rows=1, length=512, heads=32, kv_heads=8)
    two = selftest.check_rope(CUDA, BF16, rows=2, length=512, heads=32, kv_heads=8)
    record(name="liger rope alone", one_row=one.line(), two_rows=two.line(), error_two_rows=two.error)
    assert one.passed and not two.passed


def test_rms_norm(record):
    with fast_path("on", "cuda"):
        _ok(selftest.check_rms_norm(CUDA, BF16, tokens=4099, hidden=4096), record)


def test_swiglu(record):
    _ok(selftest.check_swiglu(CUDA, BF16, tokens=2053, width=14336), record)


@pytest.mark.parametrize("kernel", usable_kernels(CUDA, BF16) if torch.cuda.is_available() else [])
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_attention_kernel(kernel, rows, record):
    _ok(selftest.check_packed_attention(kernel, CUDA, BF16, rows=rows, length=2048, heads=32, kv_heads=8), record)


@pytest.mark.parametrize("d_out", [4096, 1024, 14336])
def test_fused_lora(d_out, record):
    _ok(selftest.check_fused_lora(CUDA, BF16, tokens=2048, d_in=4096, d_out=d_out, rank=16), record)


def test_chunked_loss(record):
    _ok(selftest.check_chunked_loss(CUDA, BF16, tokens=2048, hidden=4096, vocab=128256), record)


def test_fast_path_patches_come_off():
    from transformers.models.llama import modeling_llama

    before = (modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaMLP.forward)
    with fast_path("on", "cuda"):
        assert modeling_llama.LlamaRMSNorm is not before[0]
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaMLP.forward) == before
