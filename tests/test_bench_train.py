"""bench_train.py and the fast path, on CPU: the pieces that run without a GPU.

Liger's kernels are Triton-only, so on CPU the fast path is the fused LoRA linear + the chunked loss; they must
compute the same loss and LoRA gradients as plain transformers+peft on the same batch.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture()
def fast_path():
    """Apply the CPU fast path in this process and undo it afterwards, so other tests see plain classes."""
    from cogumi.train import fastpath

    with fastpath.fast_path("off", "cpu") as applied:
        yield applied


def _tiny_lora(dropout: float = 0.0, seed: int = 0):
    from cogumi.perf.models import add_lora, build_model

    model = build_model("tiny", torch.device("cpu"), torch.float32, seed=seed)
    return add_lora(model, r=4, alpha=8, dropout=dropout, target_modules="all-linear")


def _loss_and_grads(model, batch):
    from cogumi.train.step import train_step

    model.zero_grad(set_to_none=True)
    loss = train_step(model, batch, 1.0)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _batch(vocab: int = 512, bs: int = 2, seq: int = 32):
    ids = torch.randint(0, vocab, (bs, seq), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens masked, as the trainer does
    return {"input_ids": ids, "labels": labels}


@pytest.mark.slow
def test_bench_tiny_cpu_subprocess(run_script, tmp_path):
    """`bench_train.py --shape tiny` on CPU: JSON lines with the reported fields; fast agrees with plain."""
    proc = run_script("bench/bench_train.py", "--shape", "tiny", "--device", "cpu", "--variants", "baseline,fast-bs1",
                      "--steps", "2", "--warmup", "1", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUMMARY" in proc.stdout
    (out,) = tmp_path.glob("bench_train-*.jsonl")
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"baseline", "fast-bs1"}
    for row in rows.values():
        for key in ("tokens_per_s", "useful_gflop_per_token", "step_s_median", "micro_batch", "checkpoint_layers",
                    "check", "versions", "date", "command", "shape", "seq"):
            assert key in row, key
        assert row["tokens_per_s"] > 0
        assert row["check"]["loss"] > 0
    base, fast = rows["baseline"], rows["fast-bs1"]
    assert base["dropout"] == 0.05 and base["checkpoint_layers"] == 4 and base["micro_batch"] == 4
    assert fast["applied"]["fused_lora"] and fast["applied"]["chunked_loss"] and not fast["applied"]["liger"]
    assert fast["agreement"]["ok"], fast["agreement"]
    assert fast["agreement"]["loss_rel_diff"] < 1e-5
    assert "speedup_vs_baseline" in fast


@pytest.mark.slow
def test_bench_real_lengths_cpu_subprocess(run_script, tmp_path):
    """The real-length mode: padded baseline vs packed phase defaults on the shipped length mix, side by side."""
    proc = run_script("bench/bench_train.py", "--shape", "tiny", "--device", "cpu", "--seq", "1024", "--variants",
                      "baseline-real,fast-real", "--real-examples", "12", "--warmup", "1", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "real-length mix: 6819 conversations, mean 289.5, median 209, p90 624" in proc.stdout
    (out,) = tmp_path.glob("bench_train-*.jsonl")
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    base, fast = rows["baseline-real"], rows["fast-real"]
    assert base["lengths"] == fast["lengths"] == "real mix" and fast["packed"] and not base["packed"]
    assert fast["attention"] == "packed rows: sdpa_block_mask" and base["attention"] == "sdpa"
    assert base["real_tokens"] == fast["real_tokens"] > 0  # the same examples, counted without padding
    assert 0 < base["padding"] and fast["padding"] < base["padding"]
    # the same examples padded and packed: the same loss and LoRA gradient (token mean over the same tokens)
    assert fast["agreement"]["ok"] and fast["agreement"]["loss_rel_diff"] < 1e-5, fast["agreement"]


def test_fast_path_same_loss_and_grads_as_plain(fast_path):
    """Same weights, same batch: the fused LoRA + chunked loss equal peft + transformers' loss (fp32, CPU)."""
    from cogumi.train import fastpath

    batch = _batch()
    fastpath.remove_fast_path()
    plain_loss, plain_grads = _loss_and_grads(_tiny_lora(), batch)
    fastpath.apply_fast_path("off", "cpu")
    fast_loss, fast_grads = _loss_and_grads(_tiny_lora(), batch)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_lora_linear_gradcheck():
    from cogumi.train.fastpath import lora_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    bias = torch.randn(5, dtype=torch.float64, generator=gen)
    a = torch.randn(2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, w, bias, a, b, 1.5), (x, a, b))
    ref = F.linear(x, w, bias) + 1.5 * (x @ a.t()) @ b.t()
    assert torch.allclose(lora_linear(x, w, bias, a, b, 1.5), ref)


def test_lora_linear_bf16_matches_fp32_reference():
    """bf16 activations with float32 adapters: within bf16 rounding of the float64 result; grads in fp32."""
    from cogumi.train.fastpath import lora_linear

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(48, 32, generator=gen) / 6
    a = (torch.randn(8, 32, generator=gen) / 6).requires_grad_()
    b = (torch.randn(48, 8, generator=gen) / 3).requires_grad_()
    y = lora_linear(x.bfloat16(), w.bfloat16(), None, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.double(), w.double()) + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_chunked_cross_entropy_matches_torch():
    from cogumi.train.fastpath import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::5] = -100
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)  # the sum is accumulated in fp32
    g = torch.autograd.grad(3 * loss, (hidden, weight))
    g_ref = torch.autograd.grad(3 * ref, (hidden, weight))
    for got, want in zip(g, g_ref, strict=True):
        assert torch.allclose(got, want, atol=1e-7)


def test_fused_lora_not_used_with_dropout(fast_path):
    from cogumi.train.fastpath import fusable

    model = _tiny_lora(dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 4, layer.in_features)
    assert fusable(layer, x, (), {}) is None
    model = _tiny_lora(dropout=0.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fusable(layer, x, (), {}) == "default"


def test_selective_checkpointing_same_gradients(fast_path):
    from cogumi.train.probe import set_checkpointing

    batch = _batch()
    model = _tiny_lora()
    model.train()
    loss0, grads0 = _loss_and_grads(model, batch)
    assert set_checkpointing(model, 2) == [1, 3]
    assert set_checkpointing(model, 4) == [0, 1, 2, 3]
    loss1, grads1 = _loss_and_grads(model, batch)
    assert set_checkpointing(model, 0) == []
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name, grad in grads0.items():
        assert torch.allclose(grads1[name], grad, rtol=1e-5, atol=1e-7), name


def test_probe_layout_picks_fastest_fit(monkeypatch):
    """The memory probe with a simulated allocator: the fewest checkpointed layers that fit, fastest micro-batch."""
    from cogumi.train import probe

    model = _tiny_lora()
    n = probe.num_layers(model)  # 4
    state = {"layers": 0, "bs": 0, "peak": 0}
    real_set = probe.set_checkpointing

    def fake_set(m, layers):
        state["layers"] = layers
        return real_set(m, layers)

    def fake_step(m, batch, scale):
        bs = batch["input_ids"].shape[0]
        state["bs"] = bs
        # 10 GiB fixed + per sample 2 GiB per stored layer, 0.25 GiB per checkpointed one
        state["peak"] = (10 + bs * (2 * (n - state["layers"]) + 0.25 * state["layers"])) * 2**30
        if state["peak"] > 40 * 2**30:
            raise torch.cuda.OutOfMemoryError("simulated")

    class FakeEvent:
        def __init__(self, **_):
            self.t = 0.0

        def record(self):
            # time per step grows with recompute; tokens per step with the batch
            self.t = state["bs"] * (1 + state["layers"] / (3 * n)) + 0.5

        def elapsed_time(self, other):
            return other.t * 1000 * 2

    monkeypatch.setattr(probe, "set_checkpointing", fake_set)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: int(state["peak"]))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)

    def make_batch(bs):
        return {"input_ids": torch.zeros(bs, 8, dtype=torch.long)}

    layout = probe.probe_layout(model, make_batch, fake_step, budget_bytes=25 * 2**30, micro_batches=(4, 2, 1))
    rows = {r["micro_batch"]: r for r in layout["tried"]}
    for bs, row in rows.items():
        if row.get("fits"):
            assert row["peak_gib"] <= 25 * 0.98 + 1e-6, row
            # one fewer checkpointed layer would not have fitted
            fewer = row["checkpoint_layers"] - 1
            if fewer >= 0:
                assert 10 + bs * (2 * (n - fewer) + 0.25 * fewer) > 25 * 0.98
    assert layout["micro_batch"] in rows and rows[layout["micro_batch"]]["fits"]
    best = max((r for r in rows.values() if r.get("fits")), key=lambda r: r["tokens_per_s"])
    assert layout["micro_batch"] == best["micro_batch"]


def test_useful_flops_for_llama_8b():
    """The documented count for the 8B shape at seq 2048: 4N + LoRA + causal attention ~ 31.9 GFLOP/token."""
    from cogumi.perf.models import SHAPES
    from cogumi.train.flops import useful_flops_per_token

    s = SHAPES["8b"]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    frozen = layers * per_layer + v * h
    lora = 16 * layers * ((h + h) * 2 + (h + kv) * 2 + 3 * (h + i))
    flops = useful_flops_per_token(frozen, lora, layers, h, 2048)
    assert flops / 1e9 == pytest.approx(31.88, abs=0.01)


def test_lm_head_as_lora_target_is_trained_by_the_fast_path(fast_path):
    """lm_head targeted by LoRA: the fast path must give plain peft's loss and lm_head LoRA gradients.

    The chunked loss used lm_head.weight directly, so a LoRA on lm_head took no part in the loss (its gradients
    were None and the loss was that of the base head): the adapter trained everything but the layer asked for.
    """
    from cogumi.train import fastpath

    batch = _batch()
    targets = ["q_proj", "v_proj", "lm_head"]
    fastpath.remove_fast_path()
    plain = bench_lora(targets)
    plain_loss, plain_grads = _loss_and_grads(plain, batch)
    assert any("lm_head" in name for name in plain_grads)
    fastpath.apply_fast_path("off", "cpu")
    fast_loss, fast_grads = _loss_and_grads(bench_lora(targets), batch)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name

    # and it learns through lm_head's LoRA alone: a few steps lower the loss as much as plain peft does
    def train(model):
        for name, param in model.named_parameters():
            param.requires_grad_("lm_head" in name and "lora_" in name)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for _ in range(5):
            loss, _ = _loss_and_grads_keep(model, batch)
            opt.step()
            losses.append(loss)
        return losses

    fast_losses = train(bench_lora(targets))
    fastpath.remove_fast_path()
    plain_losses = train(bench_lora(targets))
    fastpath.apply_fast_path("off", "cpu")
    assert fast_losses[-1] < fast_losses[0] - 1e-3
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)


def bench_lora(targets):
    from cogumi.perf.models import add_lora, build_model

    model = build_model("tiny", torch.device("cpu"), torch.float32, seed=0)
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets)


def _loss_and_grads_keep(model, batch):
    from cogumi.train.step import train_step

    model.zero_grad(set_to_none=True)
    return float(train_step(model, batch, 1.0)), None


def test_fast_path_patches_are_undone_after_their_block():
    """The caller that wants the fast path applies it visibly for a block; the classes are plain again after it,
    also when the block fails (resolve_runtime used to patch them process-wide and leave them patched)."""
    from peft.tuners.lora import layer as lora_layer
    from transformers.models.llama import modeling_llama

    from cogumi.train.fastpath import fast_path

    plain = (lora_layer.Linear.forward, modeling_llama.LlamaForCausalLM.forward)
    with fast_path("off", "cpu") as applied:
        assert applied["fused_lora"] and applied["chunked_loss"]
        assert lora_layer.Linear.forward is not plain[0] and modeling_llama.LlamaForCausalLM.forward is not plain[1]
    assert (lora_layer.Linear.forward, modeling_llama.LlamaForCausalLM.forward) == plain
    with pytest.raises(KeyError), fast_path("off", "cpu"):
        raise KeyError("a failure inside the block")
    assert (lora_layer.Linear.forward, modeling_llama.LlamaForCausalLM.forward) == plain
