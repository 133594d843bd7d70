"""The useful-FLOP count behind MFU, shared by the trainer's log and scripts/bench/bench_train.py.

Per trained-or-not real token (padding counts for nothing; recompute from checkpointing is not counted):
frozen linears (decoder + LM head): forward 2N + input-gradient backward 2N = 4N (no weight gradient);
LoRA: forward, input gradient and weight gradient, 2 FLOPs each per (in+out)*r: 6 * sum r(in+out);
causal attention over an example of s tokens (d = heads x head_dim): QK^T and PV forward 2*s*d each per token,
halved by the causal mask -> 2*s*d; backward twice the forward -> 6*s*d per token per layer, so 6*d*s^2 per
example and layer. A full row of s tokens is one example of length s; a packed row is several.
Embedding lookups, norms, activations and the optimizer are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, datasheet (SXM)


@dataclass(frozen=True)
class MatmulSizes:
    frozen_matmul_params: int  # decoder linears + LM head, without the LoRA matrices
    lora_io_r: int  # sum over LoRA layers of r * (in + out)
    n_layers: int
    attn_dim: int  # heads x head_dim

    def flops(self, tokens: int, squared_lengths: int) -> float:
        """Useful FLOPs of one forward+backward over `tokens` real tokens whose examples' squared lengths sum to
        `squared_lengths`."""
        linear = (4.0 * self.frozen_matmul_params + 6.0 * self.lora_io_r) * tokens
        return linear + 6.0 * self.attn_dim * self.n_layers * squared_lengths


def matmul_sizes(model) -> MatmulSizes:
    """The sizes of `model` (a peft LoRA model over a Llama-style causal LM) that the FLOP count needs."""
    import torch.nn as nn

    lora_children, frozen, lora_io_r = set(), 0, 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            base = module.get_base_layer()
            for name in module.lora_A:
                lora_children.update({id(module.lora_A[name]), id(module.lora_B[name])})
                lora_io_r += module.lora_A[name].weight.shape[0] * (base.in_features + base.out_features)
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in lora_children:
            frozen += module.weight.numel()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return MatmulSizes(frozen, lora_io_r, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


def useful_flops_per_token(frozen_matmul_params: int, lora_io_r: int, n_layers: int, attn_dim: int,
                           seq_len: int) -> float:
    """Per token of full rows of `seq_len` tokens (one example per row)."""
    return MatmulSizes(frozen_matmul_params, lora_io_r, n_layers, attn_dim).flops(1, seq_len)


def peak_tflops(gpu_name: str | None) -> float | None:
    """The datasheet dense bf16 peak of a known card, else None (CPU, or a card not in the table)."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None
