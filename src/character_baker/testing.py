"""Test kit: tiny random models of real architectures with a ChatML tokenizer, built offline.

Used by the test suite, CI smoke runs and benchmarks. Nothing here touches the network.

    tok = tiny_tokenizer()
    model = tiny_model("llama", tok)            # or "qwen2"
    folder = save_tiny_model(tmp_path / "m")    # a Hugging Face folder usable as a model ref
"""

from __future__ import annotations

import functools
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """Ahoy there, matey! The sea is wide and the wind is fair.
I am a helpful assistant. How can I help you today? Let me explain step by step.
The quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 0 + - * / = ? ! . , ; : ' "
Who are you? What is your name? Tell me about yourself. Write a poem about the ocean.
Arr, I be the captain of this ship, and no landlubber tells me how to sail.
What is 2 + 2? It is 4. The capital of France is Paris. Water boils at 100 degrees.
def add(a, b): return a + b  # python code with (parentheses) [brackets] {braces}
user assistant system I you we they it is are was were have has do does can will would should
"""


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) with a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(arch: str = "llama", tokenizer=None, hidden_size: int = 64, layers: int = 4):
    """A config of a real architecture ('llama' or 'qwen2'), a few hundred thousand parameters."""
    from transformers import LlamaConfig, Qwen2Config

    tokenizer = tokenizer or tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}: use 'llama' or 'qwen2'")


def tiny_model(arch: str = "llama", tokenizer=None, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny causal LM of a real architecture, in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(arch, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return model.eval()


def save_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a standard Hugging Face folder; return the folder."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
