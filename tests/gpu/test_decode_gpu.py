"""Fast decoding (static cache + CUDA graph, cogumi.evaluate.fastdecode) against transformers' generate on the GPU:
token-identical in float32, and the agreement rate in bf16 (random weights have near-tied logits, where one bf16
rounding picks the other token), on a 2-layer Llama-3.1-8B-shape model with prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

from cogumi.evaluate import fastdecode

pytestmark = pytest.mark.gpu
NEW = 48


def model_of(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.to(dtype).eval()


def prompts():
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 37, 120, 64, 9, 250, 18, 90]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):  # left padding, as validation batches
        ids[r, width - n:] = torch.randint(1, 128256, (n,), generator=gen)
        mask[r, width - n:] = 1
    return ids.cuda(), mask.cuda()


def both(dtype):
    model = model_of(dtype)
    ids, mask = prompts()
    stop = [128009]
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)[:, ids.shape[1]:].tolist()
    ref = [row[:row.index(stop[0]) + 1] if stop[0] in row else row for row in ref]
    from cogumi.evaluate import gqa_attention

    gqa_attention.install(model)  # as validation does, before the graph is recorded
    decoder = fastdecode.Decoder(batch=ids.shape[0], max_len=fastdecode.run_length([ids.shape[1]], NEW))
    fast = fastdecode.decode_batch(model, decoder, ids, mask, NEW, stop)
    return ref, [list(map(int, row)) for row in fast]


def test_float32_tokens_are_identical(record):
    ref, fast = both(torch.float32)
    record(dtype="float32", identical_rows=sum(a == b for a, b in zip(ref, fast, strict=True)), rows=len(ref))
    assert fast == ref


def test_bf16_agreement(record):
    ref, fast = both(torch.bfloat16)
    same_prefix = []
    for a, b in zip(ref, fast, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same_prefix.append(n / max(len(a), 1))
    identical = sum(a == b for a, b in zip(ref, fast, strict=True))
    record(dtype="bfloat16", identical_rows=identical, rows=len(ref), mean_agreeing_prefix=sum(same_prefix) / len(ref))
    assert sum(x > 0 for x in same_prefix) >= len(ref) - 1  # the first token agrees on all but a near-tie
