"""Packed rows (the default): exactly the training of the same examples unpacked, and no attention across them.

CPU, fp32, a tiny Llama with a peft LoRA: the block-mask kernel of cogumi.train.packed_attention (the GPU kernels
compute the same function and are checked against the plain path by `make bench-train`, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import pytest
import torch

from cogumi.train.data import Collator, Example, pack
from cogumi.train.layout import probe_batch, probe_shape
from cogumi.train.packed_attention import (
    batch_to_device,
    block_causal_mask,
    choose_kernel,
    packed_attention,
    packed_kernel_of,
    require_packed_attention,
    segment_bounds,
)
from cogumi.train.step import accumulate, token_weights


def _model(seed: int = 0):
    from cogumi.perf.models import add_lora, build_model

    model = add_lora(build_model("tiny", torch.device("cpu"), torch.float32, seed=seed), r=4, alpha=8, dropout=0.0,
                     target_modules="all-linear")
    return model.train()


def _examples(lengths, seed: int = 3) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 512, (n,), generator=gen).tolist()
        prompt = n // 3  # the first third is the prompt: not trained on
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def _step(model, batches: list[dict]) -> tuple[float, dict]:
    """One optimizer step's loss and LoRA gradients, weighted by trained tokens as the trainer does."""
    model.zero_grad(set_to_none=True)
    trained = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    loss = float(accumulate(model, batches, token_weights(trained)))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def test_packed_equals_unpacked_loss_and_lora_gradients():
    """The same 7 examples, unpacked in micro-batches of 2 and packed into rows of 64: the same loss and LoRA
    gradients within 1e-5 (fp32), so packing changes speed, never what is learned."""
    examples = _examples([9, 31, 17, 40, 12, 25, 6])
    model = _model()
    unpacked = Collator(pad_id=0, packed=False)
    loss_u, grads_u = _step(model, [unpacked(examples[i:i + 2]) for i in range(0, len(examples), 2)])
    rows = pack(examples, 64)
    assert 1 < len(rows) < len(examples)
    packed = Collator(pad_id=0, packed=True)
    with packed_attention(model, "sdpa_block_mask"):
        loss_p, grads_p = _step(model, [packed(rows[:1]), packed(rows[1:])])
    assert packed_kernel_of(model) is None  # undone on exit
    assert loss_p == pytest.approx(loss_u, rel=1e-5, abs=1e-6)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) > 0
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def row0_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Liger 0.3.1's RoPE kernel as plain torch: every row of the micro-batch rotated with row 0's cos/sin."""
    from cogumi.train.selftest import rope_reference

    return rope_reference(q, k, cos[:1].expand_as(cos).float(), sin[:1].expand_as(sin).float())


def test_packed_rows_keep_their_own_positions_under_a_rope_that_reads_row_0(monkeypatch):
    """The fast path's RoPE kernel (Liger 0.3.1) reads row 0's cos/sin for every row. Packed rows are given to RoPE
    as one row, so even such a kernel rotates every token by its own position: packed = unpacked (ISSUES_LOG B38).
    On the code before the fix, rows 1.. of each packed micro-batch trained with row 0's positions."""
    from transformers.models.llama import modeling_llama

    examples = _examples([9, 31, 17, 40, 12, 25, 6])
    model = _model()
    loss_u, grads_u = _step(model, [Collator(pad_id=0, packed=False)(examples[i:i + 2])
                                    for i in range(0, len(examples), 2)])
    rows = pack(examples, 64)
    assert len(rows) >= 3
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", row0_rope)
    with packed_attention(model, "sdpa_block_mask"):
        loss_p, grads_p = _step(model, [Collator(pad_id=0, packed=True)(rows)])  # one micro-batch, several rows
    assert loss_p == pytest.approx(loss_u, rel=1e-5, abs=1e-6)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_packed_examples_cannot_see_each_other():
    """Change one example's tokens: the logits of the other examples in its row do not move."""
    examples = _examples([11, 20, 15, 9])
    changed = list(examples)
    changed[1] = Example([(t + 7) % 512 for t in examples[1].input_ids], examples[1].labels)
    collate = Collator(pad_id=0, packed=True)
    model = _model().eval()
    with torch.no_grad(), packed_attention(model, "sdpa_block_mask"):
        a = model(**{k: v for k, v in collate([examples]).items() if k != "labels"}).logits[0]
        b = model(**{k: v for k, v in collate([changed]).items() if k != "labels"}).logits[0]
    starts = [0, 11, 31, 46, 55]
    for k in (0, 2, 3):
        torch.testing.assert_close(a[starts[k]:starts[k + 1]], b[starts[k]:starts[k + 1]], rtol=0, atol=0)
    assert not torch.allclose(a[starts[1]:starts[2]], b[starts[1]:starts[2]])
    # and the check is not vacuous: plain causal attention on the same row lets example 2 see example 1
    with torch.no_grad():
        plain_a = model(input_ids=collate([examples])["input_ids"]).logits[0]
        plain_b = model(input_ids=collate([changed])["input_ids"]).logits[0]
    assert not torch.allclose(plain_a[starts[2]:starts[3]], plain_b[starts[2]:starts[3]])


def test_a_packed_batch_is_refused_without_packed_attention():
    model = _model()
    with pytest.raises(RuntimeError, match="attend across"):
        require_packed_attention(model)
    with packed_attention(model, "sdpa_block_mask") as kernel:
        assert require_packed_attention(model) == kernel == "sdpa_block_mask"


def test_segment_bounds_and_mask_from_positions():
    collate = Collator(pad_id=0, packed=True)
    batch = collate([_examples([3, 4]), _examples([5])])  # row 2: 5 tokens + 2 of padding (its own segment)
    cu, longest = segment_bounds(batch["position_ids"])
    assert cu.tolist() == [0, 3, 7, 12, 14] and longest == 5 and cu.dtype == torch.int32
    moved = batch_to_device(batch, torch.device("cpu"))  # the bounds ride along, computed from the host copy
    assert moved["position_ids"]._cogumi_segment_bounds[0].tolist() == cu.tolist()
    mask = block_causal_mask(batch["position_ids"])
    assert mask.shape == (2, 1, 7, 7)
    assert mask[0, 0, 4, 3] and not mask[0, 0, 3, 4] and not mask[0, 0, 3, 2]  # causal, and blind to example 1
    assert mask[1, 0, 6, 5] and not mask[1, 0, 5, 4]  # padding only sees padding: no empty softmax row


def test_kernel_choice_on_cpu():
    assert choose_kernel(torch.device("cpu"), torch.float32) == "sdpa_block_mask"
    from cogumi.core.errors import UserError

    with pytest.raises(UserError):
        choose_kernel(torch.device("cpu"), torch.float32, "aten_flash_varlen")


def test_probe_rows_are_shaped_like_the_run():
    """The memory probe measures the run's largest row: the fullest packed row with its own examples, or the
    longest example when unpacked (a micro-batch pads to it), never a full random row regardless of packing."""
    examples = _examples([30, 50, 20, 40, 10, 45, 8])
    rows = pack(examples, 64)  # first fit: [30, 20, 10] [50, 8] [40] [45]
    fullest = rows[0]
    assert probe_shape(rows, packed=True) == [30, 20, 10]
    assert probe_shape(examples, packed=False) == [50]
    make = probe_batch(Collator(pad_id=0, packed=True), rows, 512, torch.device("cpu"))
    batch = make(3)
    assert batch["input_ids"].shape == (3, sum(probe_shape(rows, packed=True)))
    assert ((batch["position_ids"] == 0).sum(dim=1) == len(fullest)).all()  # one segment per example of that row
    # each row has its own boundaries, as the run's rows do: a per-row defect must change what the probe measures
    assert len({tuple(r.tolist()) for r in batch["position_ids"]}) == 3
    make = probe_batch(Collator(pad_id=0, packed=False), examples, 512, torch.device("cpu"))
    assert make(2)["input_ids"].shape == (2, 50)


def test_packing_fills_rows_of_real_lengths():
    """The shipped real-length mix packs into 2048-token rows with under 2 % padding (greedy: 11.5 %, ISSUES_LOG B17),
    every example whole and exactly once."""
    import random

    from cogumi.perf.lengths import load_mix

    lengths = load_mix()["lengths"]
    random.Random(0).shuffle(lengths)
    examples = [Example([0] * min(n, 2048), [0] * min(n, 2048)) for n in lengths]
    rows = pack(examples, 2048)
    used = [sum(len(e.input_ids) for e in row) for row in rows]
    assert max(used) <= 2048 and sum(len(r) for r in rows) == len(examples)
    assert sorted(id(e) for r in rows for e in r) == sorted(map(id, examples))
    assert 1 - sum(used) / (2048 * len(rows)) < 0.02


def test_block_mask_attention_has_no_nan_where_an_example_starts_mid_row():
    """torch 2.3.1's fused CPU sdpa gave NaN for the first token of an example at some offsets of row 2+ (a query
    whose only key is itself; ISSUES_LOG B41): every output of the packed attention is finite and equals the
    example-by-example reference."""
    from cogumi.train.packed_attention import attend
    from cogumi.train.selftest import attention_reference

    positions = torch.stack([torch.arange(997),
                             torch.cat([torch.arange(603), torch.arange(376), torch.arange(18)]),
                             torch.cat([torch.arange(921), torch.arange(76)])])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 997, 16, generator=gen) for _ in range(3))
    out = attend("sdpa_block_mask", q, k, v, positions)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, positions), rtol=1e-5, atol=1e-5)
