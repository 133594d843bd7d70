"""Tiny Llama models built from a config, with a tokenizer trained here: no download, seconds on CPU.

Used by the tests and by `make demo`. The tokenizer is byte-level BPE (any text encodes) with the
Llama-3 special tokens and chat template, so the real formatting and loss-masking code paths run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Llama-3 style specials. The pad token mirrors Llama 3.1's reserved right-pad token.
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "You are a helpful assistant.",
    "What is 12 + 30? The answer is \\boxed{42}.",
    "def add(a, b):\n    return a + b\n",
    "assert add(2, 3) == 5",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "system user assistant",
]


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # Digits stay single tokens (Llama 3 splits numbers too), so arithmetic and copying can generalise.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        # A bare PreTrainedTokenizerFast also returns token_type_ids, which LlamaForCausalLM.forward rejects.
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate_size: int = 128, max_positions: int = 1024, seed: int = 0, dtype=None,
                output_gain: float = 1.0):
    """A randomly initialised LlamaForCausalLM sized for the tokenizer.

    `output_gain` scales lm_head. LoRA on all linear layers leaves lm_head and the final norm frozen, so with the
    default init (std 0.02) every logit of a tiny model stays below ~2 and no fine-tune can become confident.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32" if dtype is None else str(dtype).replace("torch.", ""),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if output_gain != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(output_gain)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(out_dir: Path, *, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384,
                    max_shard_size: str | None = None, dtype=None, seed: int = 0, **model_kwargs) -> Path:
    """Build and save a tiny model folder (config, safetensors weights, tokenizer, chat template).

    `max_shard_size` (e.g. "40KB") writes a sharded checkpoint with model.safetensors.index.json.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus, vocab_size)
    model = build_model(tokenizer, seed=seed, dtype=dtype, **model_kwargs)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir
