"""Random-weight Llama shapes the speed benchmarks build (speed and memory do not depend on the weights' values)."""

from __future__ import annotations

SIZES = {
    # 16 layers of a 2048-wide Llama with a 32k vocabulary: 0.85 B parameters, 1.7 GB in bf16.
    "0.9b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, shard="450MB"),
    # meta-llama/Meta-Llama-3.1-8B-Instruct's shape (its hub checkpoint has 4 shards of up to 5 GB).
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, shard="5GB"),
    # small enough for a test: ~50 M parameters in ~4 shards
    "test": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=10,
                 num_attention_heads=8, num_key_value_heads=4, shard="24MB"),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    shape = {k: v for k, v in SIZES[size].items() if k != "shard"}
    return LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       torch_dtype="bfloat16")
