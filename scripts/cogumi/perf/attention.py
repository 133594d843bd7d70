"""Attention kernels for packed rows, measured against each other on the phase's attention shape (GPU).

Rows packed from the real-length mix (cogumi.perf.lengths), the 8B attention shape (32 query heads, 8 key/value
heads of 128), bf16, forward + backward. Each candidate's output and input gradients are compared with an fp32
block-mask reference, so a fast kernel that is wrong shows up here. `sdpa_full_causal` (one causal attention over
the whole row, which lets examples see each other) is not a candidate: it is the speed a packed kernel can reach.
`sdpa_segments` runs sdpa once per example (a loop), the simplest exact alternative.
"""

from __future__ import annotations

import datetime as dt

from cogumi.perf.models import device_info, versions


def _segments_attention(q, k, v, position_ids):
    import torch
    import torch.nn.functional as F

    from cogumi.train.packed_attention import segment_bounds

    bsz, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu, _ = segment_bounds(position_ids)
    flat = [t.transpose(1, 2).reshape(bsz * length, heads, dim) for t in (q, k, v)]
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        part = [t[start:end].transpose(0, 1)[None] for t in flat]
        outs.append(F.scaled_dot_product_attention(*part, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs).reshape(bsz, length, heads * dim)


def run_attention_kernels(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from cogumi.perf.lengths import load_mix, mix_examples
    from cogumi.train.data import Collator, pack
    from cogumi.train.packed_attention import KERNELS, attend, choose_kernel

    device = torch.device(spec["device"])
    if device.type != "cuda":
        return {"variant": "attention-kernels", "device": "cpu"}
    seq, bsz, heads, kv_heads, dim = int(spec["seq"]), 4, 32, 8, 128
    rows = pack(mix_examples(load_mix(), 1000, seq, 400, seed=5), seq)[:bsz]
    positions = Collator(pad_id=0, packed=True)(rows)["position_ids"].to(device)
    length = positions.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(bsz, n, length, dim, generator=gen).to(device) for n in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(bsz, length, heads * dim, generator=gen).to(device)

    def run(fn, dtype):
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(grad_out.to(dtype))
        return out.float(), [t.grad.float() for t in (q, k, v)]

    ref_out, ref_grads = run(lambda q, k, v: attend("sdpa_block_mask", q, k, v, positions), torch.float32)
    usable = [k for k in KERNELS if _can(k, device)]
    candidates = {name: (lambda q, k, v, name=name: attend(name, q, k, v, positions)) for name in usable}
    candidates["sdpa_segments"] = lambda q, k, v: _segments_attention(q, k, v, positions)
    candidates["sdpa_full_causal"] = lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True).transpose(1, 2).reshape(
        bsz, length, heads * dim)
    out = {}
    for name, fn in candidates.items():
        try:
            got, grads = run(fn, torch.bfloat16)
            for _ in range(3):
                run(fn, torch.bfloat16)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                run(fn, torch.bfloat16)
            end.record()
            torch.cuda.synchronize()
            exact = name != "sdpa_full_causal"
            out[name] = {"ms_fwd_bwd": round(start.elapsed_time(end) / 10, 3),
                         "max_abs_out": round(float((got - ref_out).abs().max()), 5) if exact else None,
                         "max_abs_grad": round(max(float((g - r).abs().max()) for g, r in zip(
                             grads, ref_grads, strict=True)), 5) if exact else None}
        except Exception as err:  # noqa: BLE001 - a kernel that cannot run here is reported, not fatal
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"variant": "attention-kernels", "rows": bsz, "row_tokens": length,
            "segments": int((positions == 0).sum()), "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
            "kernels": out, "auto_choice": choose_kernel(device, torch.bfloat16), **device_info(device),
            "versions": versions(), "date": dt.date.today().isoformat()}


def _can(kernel: str, device) -> bool:
    import torch

    from cogumi.core.errors import UserError
    from cogumi.train.packed_attention import choose_kernel

    try:
        choose_kernel(device, torch.bfloat16, kernel)
        return True
    except UserError:
        return False
