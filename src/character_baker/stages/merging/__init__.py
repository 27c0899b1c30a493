"""Merging: combine the run's LoRA adapters into the persona, sweep its scale, export it.

    delta   exact weighted sums of adapter deltas (no cross terms), folding, SVD re-factorisation,
            PEFT's `linear` combination for parity
    merge   the `merge` stage: adapters/persona/ (+ model/ when folding)
    sweep   the `merge_sweep` stage: quick metrics per merge scale (KL to the base, ...)
    export  standard Hugging Face folders with a model card, and portable PEFT adapters

Heavy imports (torch, transformers, peft) happen when these modules are imported, not here.
"""
