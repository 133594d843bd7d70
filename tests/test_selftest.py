"""The kernel self-test (cogumi.train.selftest) on the CPU: it passes the plain kernels, fails a RoPE that reads
row 0's positions for every row (Liger 0.3.1's defect, ISSUES_LOG B38) and a kernel that cannot run, and the
refusal names the kernel and its switch. The GPU kernels themselves are checked by tests/gpu/ (`make test-gpu`)."""

from __future__ import annotations

import pytest
import torch

from cogumi.core.errors import UserError
from cogumi.train.kernels import per_row_rope
from cogumi.train.selftest import (
    check_chunked_loss,
    check_rope,
    packed_positions,
    refuse_failed,
    rope_reference,
    rope_tables,
    run_checks,
)

CPU = torch.device("cpu")


def row0_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """What Liger 0.3.1's RoPE kernel computes: every row rotated with row 0's cos/sin."""
    return rope_reference(q, k, cos[:1].expand_as(cos).float(), sin[:1].expand_as(sin).float())


def test_plain_kernels_pass_on_the_cpu():
    checks = run_checks(["rope", "rms_norm", "attention:sdpa_block_mask", "fused_lora"], CPU, torch.bfloat16)
    checks.append(check_chunked_loss(CPU, torch.bfloat16, vocab=4096))
    assert [c.name for c in checks] == ["rope", "rms_norm", "attention:sdpa_block_mask", "fused_lora",
                                        "chunked_loss"]
    for check in checks:
        assert check.passed, check.line()
        assert 0 < check.noise < 0.05 and check.error <= check.allowed  # a real bf16 noise floor was measured


def test_a_rope_that_reads_row_0_fails_and_per_row_rope_fixes_it(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", row0_rope)
    broken = check_rope(CPU, torch.bfloat16)
    assert not broken.passed and broken.error > 10 * broken.allowed, broken.line()
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", per_row_rope(row0_rope))
    fixed = check_rope(CPU, torch.bfloat16)
    assert fixed.passed, fixed.line()


def test_per_row_rope_is_exactly_the_reference_in_float32():
    positions = packed_positions(4, 40, seed=1)
    assert len({tuple(r.tolist()) for r in positions}) == 4  # rows differ
    cos, sin = rope_tables(positions, 64)
    q, k = torch.randn(4, 6, 40, 64), torch.randn(4, 2, 40, 64)
    for got, want in zip(per_row_rope(row0_rope)(q, k, cos, sin), rope_reference(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_kernel_that_cannot_run_is_a_failed_check_and_refuses_the_run():
    (swiglu,) = run_checks(["swiglu"], CPU, torch.bfloat16)  # Triton needs a GPU: it crashes here
    assert not swiglu.passed and "crashed" in swiglu.detail
    with pytest.raises(UserError) as refused:
        refuse_failed([swiglu])
    text = refused.value.render()
    assert "swiglu" in text and "train.liger=off" in text and "torch" in text
    refuse_failed(run_checks(["rope"], CPU, torch.bfloat16))  # nothing failed: no refusal
