"""Training stages' shared layer: tokenisation with loss masks, chunked losses, the LoRA loop.

    tokenize     chat-template rendering, assistant-turn loss masks, length filtering
    batching     length-bucketed, process-independent data order; collation
    losses       chunked token log-probs / KL (no [batch, seq, vocab]); DPO, NLL, k3 KL terms
    fused_lora   LoRA linear layers with the scale and the add fused into the GEMMs
    trainer      `LoraTrainer` / `run_training`: config -> setup -> train -> cleanup, any `Objective`
    checkpoints  atomic checkpoints, resume, the final PEFT adapter
    reporting    logs/<stage>.jsonl, progress display, TensorBoard / W&B
    dpo          the DPO objective, cached reference log-probs, `train_dpo`
    launch       re-run a command under `accelerate launch` / `torchrun`

Heavy imports (torch, transformers, peft) happen when these modules are imported, not here.
"""

from __future__ import annotations

__all__ = ["train_dpo", "run_training"]


def __getattr__(name: str):
    if name == "train_dpo":
        from character_baker.stages.training.dpo import train_dpo

        return train_dpo
    if name == "run_training":
        from character_baker.stages.training.trainer import run_training

        return run_training
    raise AttributeError(name)
