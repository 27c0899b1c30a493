"""GGUF -> Hugging Face folder: a real GGUF file written here, pulled, reloaded in a fresh process.

The GGUF is written the way llama.cpp's converter writes a Llama: llama.cpp tensor names, Q/K rows
permuted for its rotary layout, architecture metadata, and a `gpt2` byte-level BPE tokenizer
(tokens, merges, token types, special ids) with the chat template in the metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from character_baker.backends import catalogue
from character_baker.testing import tiny_model, tiny_tokenizer

CONTROL, NORMAL = 3, 1  # gguf.TokenType values


def _llama_cpp_permute(weights, n_head: int):
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute); the loader undoes it."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _gguf_tensors(model):
    """(llama.cpp name, float32 array) for every weight of a tiny HF Llama."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if base.endswith("self_attn.q_proj"):
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        yield f"{name_map.get_name(base)}.{suffix}", array


def _write_tokenizer_metadata(writer, tokenizer) -> None:
    """A gpt2-style BPE tokenizer as llama.cpp stores it, with the chat template."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([CONTROL if token in special else NORMAL for token in tokens])
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama with its tokenizer and chat template as a float32 GGUF file."""
    import gguf

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _write_tokenizer_metadata(writer, tokenizer)
    for name, array in _gguf_tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
