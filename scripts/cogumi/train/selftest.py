"""Each fast-path kernel against the plain formula, on the device, with rows that differ from each other.

A CPU test cannot see a GPU kernel: on the CPU, Liger, the varlen attention kernels and our SwiGLU do not run. So
`make check` and every training run on a CUDA host call `run_checks` (seconds, tiny tensors) for the kernels the run
will use, and `make train` refuses a kernel that fails (ISSUES_LOG B38, B40); tests/gpu/ calls the same checks at
Llama-3.1-8B shapes.

The tolerance is a measured noise floor, not a guess: each check computes the plain formula twice, in the run's
dtype (bf16) and in float32, on the same inputs. The fast kernel's error against the float32 result may be at most
NOISE_FACTOR times the plain bf16 error (the difference every bf16 user already accepts), with a floor of one bf16
rounding of the largest value. Errors are relative: max |a - reference| / max |reference|, the worst over the
outputs and the input gradients. Inputs have per-row positions that differ (rows start at different offsets and
restart, as packed rows do), so a kernel that reads row 0's positions for every row fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NOISE_FACTOR = 4.0  # measured on the H200: fast kernels stay within 2x the plain bf16 error (docs/GPU_CHECKS.md)
BF16_ROUNDING = 2.0 ** -8  # one bf16 rounding, relative: the floor when the plain bf16 error happens to be ~0


@dataclass
class Check:
    name: str
    error: float  # relative error of the fast kernel against the float32 formula
    noise: float  # relative error of the plain formula in the run's dtype against float32
    allowed: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name:<22} {verdict:<6} error {self.error:.2e} (allowed {self.allowed:.2e} = "
                f"{NOISE_FACTOR:g} x bf16 noise {self.noise:.2e}){' ' + self.detail if self.detail else ''}")


def relative_error(values, reference) -> float:
    worst = 0.0
    for a, ref in zip(values, reference, strict=True):
        scale = ref.detach().float().abs().max().clamp(min=1e-12)
        worst = max(worst, float((a.detach().float() - ref.detach().float()).abs().max() / scale))
    return worst


def compare(name: str, fast, plain, reference, factor: float = NOISE_FACTOR, detail: str = "") -> Check:
    """fast, plain (both in the run's dtype) and reference (float32): sequences of matching tensors."""
    error, noise = relative_error(fast, reference), relative_error(plain, reference)
    allowed = factor * max(noise, BF16_ROUNDING)
    return Check(name, error, noise, allowed, error <= allowed, detail)


def _with_grads(fn, inputs: list[torch.Tensor], grad_seed: int) -> list[torch.Tensor]:
    """fn's outputs followed by the gradients of the inputs for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator(device=outputs[0].device).manual_seed(grad_seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum() for o in outputs)
    total.backward()
    return [o.detach() for o in outputs] + [t.grad for t in leaves]


def run_variants(fast_fn, plain_fn, inputs: list[torch.Tensor], dtype: torch.dtype, seed: int = 0):
    fast = _with_grads(fast_fn, [t.to(dtype) for t in inputs], seed)
    plain = _with_grads(plain_fn, [t.to(dtype) for t in inputs], seed)
    reference = _with_grads(plain_fn, [t.float() for t in inputs], seed)
    return fast, plain, reference


# ------------------------------------------------------------------ per-row positions


def packed_positions(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """(rows, length) position_ids of packed rows: each row holds examples of its own lengths (restarting at 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        start, pos = 0, []
        while start < length:
            n = int(torch.randint(max(2, length // 8), max(3, length // 2 + 1), (1,), generator=gen)) + r
            n = min(n, length - start)
            pos.extend(range(n))
            start += n
        out[r] = torch.tensor(pos)
    return out


def rope_tables(position_ids: torch.Tensor, dim: int, base: float = 500000.0):
    """cos, sin (rows, L, dim) in float32, as transformers' LlamaRotaryEmbedding computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb, written out: (B, H, L, D) with cos/sin (B, L, D)."""

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rms_norm_reference(x, weight, eps: float = 1e-5):
    """transformers' LlamaRMSNorm, written out: float32 statistics, the weight applied in the input's dtype."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def attention_reference(q, k, v, position_ids):
    """Causal attention within each packed example, example by example (plain sdpa): (B, H, L, D) -> (B, L, H*D)."""
    bsz, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    out = []
    for row in range(bsz):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist() + [length]
        pieces = []
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            kk = k[row:row + 1, :, a:b].repeat_interleave(groups, dim=1)
            vv = v[row:row + 1, :, a:b].repeat_interleave(groups, dim=1)
            pieces.append(F.scaled_dot_product_attention(q[row:row + 1, :, a:b], kk, vv, is_causal=True))
        out.append(torch.cat(pieces, dim=2))
    return torch.cat(out).transpose(1, 2).reshape(bsz, length, heads * dim)


# ------------------------------------------------------------------ the checks


def check_rope(device, dtype, rows=3, length=96, heads=4, kv_heads=2, dim=128, seed=0) -> Check:
    from transformers.models.llama import modeling_llama

    gen = torch.Generator(device="cpu").manual_seed(seed)
    positions = packed_positions(rows, length, seed)
    positions[1:] += 7 * torch.arange(1, rows)[:, None]  # rows differ even where they restart alike
    cos, sin = rope_tables(positions.to(device), dim)
    q = torch.randn(rows, heads, length, dim, generator=gen).to(device)
    k = torch.randn(rows, kv_heads, length, dim, generator=gen).to(device)
    active = modeling_llama.apply_rotary_pos_emb  # what the model calls: patched by the fast path, or not

    def fast(q, k):
        return active(q, k, cos.to(q.dtype), sin.to(q.dtype))

    def plain(q, k):
        return rope_reference(q, k, cos, sin)

    return compare("rope", *run_variants(fast, plain, [q, k], dtype, seed), detail=f"{rows} rows, own positions")


def check_rms_norm(device, dtype, tokens=257, hidden=4096, seed=0) -> Check:
    from transformers.models.llama import modeling_llama

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)
    module_cls = modeling_llama.LlamaRMSNorm  # Liger's class under the fast path

    def fast(x):
        norm = module_cls(hidden, eps=1e-5).to(device=device, dtype=x.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.weight.requires_grad_(False)  # frozen in a LoRA run
        return norm(x)

    def plain(x):
        return rms_norm_reference(x, weight.to(x.dtype))

    return compare("rms_norm", *run_variants(fast, plain, [x], dtype, seed), detail=module_cls.__name__)


def check_swiglu(device, dtype, tokens=129, width=14336, seed=0) -> Check:
    from cogumi.train.kernels import swiglu

    gen = torch.Generator(device="cpu").manual_seed(seed)
    gate = (torch.randn(tokens, width, generator=gen) * 2).to(device)
    up = torch.randn(tokens, width, generator=gen).to(device)
    return compare("swiglu", *run_variants(swiglu, swiglu_reference, [gate, up], dtype, seed))


def check_packed_attention(kernel: str, device, dtype, rows=3, length=192, heads=4, kv_heads=2, dim=128,
                           seed=0) -> Check:
    from cogumi.train.packed_attention import attend, batch_to_device

    gen = torch.Generator(device="cpu").manual_seed(seed)
    positions = packed_positions(rows, length, seed)
    q = torch.randn(rows, heads, length, dim, generator=gen).to(device)
    k = torch.randn(rows, kv_heads, length, dim, generator=gen).to(device)
    v = torch.randn(rows, kv_heads, length, dim, generator=gen).to(device)
    pos = batch_to_device({"position_ids": positions}, device)["position_ids"]

    def fast(q, k, v):
        return attend(kernel, q, k, v, pos)

    def plain(q, k, v):
        return attention_reference(q, k, v, positions)

    n_segments = int((positions == 0).sum())
    return compare(f"attention:{kernel}", *run_variants(fast, plain, [q, k, v], dtype, seed),
                   detail=f"{rows} rows, {n_segments} examples")


def check_fused_lora(device, dtype, tokens=131, d_in=4096, d_out=1024, rank=16, seed=0) -> Check:
    from cogumi.train.fastpath import lora_linear

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen).to(device)
    weight = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device)
    a = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).to(device)
    b = (torch.randn(d_out, rank, generator=gen) * 0.1).to(device)
    scale = 2.0

    def fast(x, a, b):  # adapters stay float32 master weights, as peft keeps them
        return lora_linear(x, weight.to(x.dtype), None, a.float(), b.float(), scale)

    def plain(x, a, b):  # peft's lora.Linear: base in the activation dtype, the LoRA term in the adapter's
        return F.linear(x, weight.to(x.dtype)) + (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(x.dtype)

    return compare("fused_lora", *run_variants(fast, plain, [x, a, b], dtype, seed))


def check_chunked_loss(device, dtype, tokens=300, hidden=512, vocab=128256, seed=0) -> Check:
    from cogumi.train.fastpath import chunked_linear_cross_entropy

    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = -100  # masked prompt tokens
    labels = labels.to(device)

    def fast(h):
        return chunked_linear_cross_entropy(h, weight.to(h.dtype), labels, chunk_rows=128)

    def plain(h):
        return F.cross_entropy((h @ weight.to(h.dtype).t()).float(), labels, ignore_index=-100)

    return compare("chunked_loss", *run_variants(fast, plain, [h], dtype, seed))


def run_checks(pieces: list[str], device, dtype=torch.bfloat16) -> list[Check]:
    """The checks of `pieces` (names from fastpath.TRITON_PIECES, "attention:<kernel>", fused_lora, chunked_loss).

    A piece whose check crashes (a kernel that does not compile on this stack) is a failed check, not a traceback.
    """
    by_name = {"rope": check_rope, "rms_norm": check_rms_norm, "swiglu": check_swiglu,
               "fused_lora": check_fused_lora, "chunked_loss": check_chunked_loss}
    results = []
    for piece in pieces:
        try:
            if piece.startswith("attention:"):
                results.append(check_packed_attention(piece.split(":", 1)[1], device, dtype))
            else:
                results.append(by_name[piece](device, dtype))
        except Exception as err:  # noqa: BLE001 - a kernel that cannot compile or run is what this reports
            first = str(err).strip().splitlines()[-1][:160] if str(err).strip() else ""
            crashed = f"crashed: {type(err).__name__} {first}"
            results.append(Check(piece, float("inf"), float("nan"), 0.0, False, crashed))
    return results


SWITCH_OF = {"rope": "train.liger=off", "rms_norm": "train.liger=off", "swiglu": "train.liger=off",
             "attention": "data.packing=false", "fused_lora": "lora.dropout=0.05 (peft's own forward)",
             "chunked_loss": "no switch (the plain loss holds the full logits): report it"}


def stack_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "triton", "liger-kernel", "flash-attn"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found.append(torch.cuda.get_device_name(0))
    return ", ".join(found)


def pieces_of_run(applied: dict, packed_kernel: str | None) -> list[str]:
    """The kernels a training run with this fast path and packed attention kernel will launch."""
    return list(applied.get("kernels", [])) + ([f"attention:{packed_kernel}"] if packed_kernel else [])


def require_kernels(applied: dict, device, dtype, packed_kernel: str | None) -> list[Check]:
    """On a CUDA device: self-test the run's kernels, log each, refuse the run if one failed (UserError, exit 2)."""
    if device.type != "cuda":
        return []
    checks = run_checks(pieces_of_run(applied, packed_kernel), device, dtype)
    for check in checks:
        log.info("kernel self-test: %s", check.line())
    refuse_failed(checks)
    return checks


def refuse_failed(checks: list[Check]) -> None:
    """UserError (exit 2) naming each failed kernel, the stack's versions and the switch that turns it off."""
    from cogumi.core.errors import UserError

    failed = [c for c in checks if not c.passed]
    if failed:
        switches = sorted({SWITCH_OF[c.name.split(":")[0]] for c in failed})
        raise UserError(f"kernel self-test failed for {', '.join(c.name for c in failed)}: the run would train "
                        f"wrongly or crash with this stack", where=f"{stack_versions()}\n  "
                        + "\n  ".join(c.line() for c in failed),
                        fix=f"turn the kernel off with {' and '.join(switches)} (slower, exact), or install the "
                            f"locked stack with `make setup`; `make check` runs the same self-test")
