"""Token log-probs and loss terms, computed without ever materialising [batch, seq, vocab].

The model's backbone runs once; only the hidden states of positions whose *next* token is
trained on are kept ([tokens, hidden]); `lm_head` is applied to them `chunk_size` tokens at a
time, so at most one chunk's vocabulary-wide logits exist, in forward and in backward (the
chunk's logits are recomputed in backward, which costs one extra lm_head matmul per trained
token and saves `tokens x vocab x 4` bytes): a fused autograd function for a plain output
projection (`FusedChunkedLogProbs`), activation checkpointing of each chunk otherwise.

Loss terms (per-token values are float32):

- DPO (Rafailov et al. 2023): `-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))` where
  `pi_*`/`ref_*` are the policy/reference log-probs summed over each response's tokens.
- NLL on chosen: mean over chosen response tokens of `-log pi(token)`.
- Per-token KL to the reference on chosen tokens, **k3 estimator** (Schulman 2020,
  "Approximating KL divergence"): with `log_ratio = ref - pi` per token,
  `k3 = exp(log_ratio) - log_ratio - 1`, averaged over chosen response tokens. It is >= 0,
  zero exactly when the two log-probs agree, and needs only the reference log-prob of the
  token itself (cached once before training), not the reference's whole distribution. Its
  gradient is `(1 - pi/ref)` per token times d(log pi). Caveat: the chosen tokens were written by
  the teacher, not sampled from the policy, so this is a sampled *regulariser* that keeps the
  policy's chosen-token probabilities near the reference's; it is an unbiased estimate of
  KL(policy || reference) only on tokens sampled from the policy.
- `chunked_token_kl` gives the exact full-vocabulary KL(p || q) per token, also in chunks, for
  objectives whose reference runs online (SDFT: the adapter-off teacher's hidden states).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _needs_grad(lm_head: nn.Module, *tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in lm_head.parameters())


def chunked_over_tokens(fn: Callable[..., torch.Tensor], lm_head: nn.Module, chunk_size: int,
                        *tensors: torch.Tensor) -> torch.Tensor:
    """Apply `fn(lm_head, *chunks)` over row chunks of `tensors`, checkpointed when gradients flow."""
    rows = tensors[0].shape[0]
    if rows == 0:
        return tensors[0].new_zeros(0, dtype=torch.float32)
    grad = _needs_grad(lm_head, *tensors)
    pieces = []
    for start in range(0, rows, chunk_size):
        chunk = [t[start:start + chunk_size] for t in tensors]
        if grad:
            pieces.append(checkpoint(fn, lm_head, *chunk, use_reentrant=False))
        else:
            pieces.append(fn(lm_head, *chunk))
    return torch.cat(pieces)


def _logprob_chunk(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class FusedChunkedLogProbs(torch.autograd.Function):
    """log p(label) of [tokens, hidden] states through a bias-free output projection, chunk by chunk.

    The same numbers as `_logprob_chunk` under activation checkpointing, with a hand-written
    backward: each chunk's logits are recomputed once and turned into the gradient in place,
    (one-hot - softmax) x upstream, softmax = exp(logits - the saved logsumexp), so no autograd
    graph, float32 copy or second logsumexp is built per chunk (17% less time for the output
    head's forward + backward at SmolLM2 shapes on a CPU). Saves only the inputs and [tokens]
    logsumexps: at most one chunk's vocabulary-wide logits exist at a time.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        """Token log-probs, float32 [tokens]."""
        logps, normalisers = [], []
        for start in range(0, len(hidden), chunk_size):
            logits = F.linear(hidden[start:start + chunk_size], weight).float()
            normaliser = torch.logsumexp(logits, dim=-1)
            logps.append(logits.gather(-1, labels[start:start + chunk_size, None]).squeeze(-1) - normaliser)
            normalisers.append(normaliser)
        ctx.save_for_backward(hidden, weight, labels, torch.cat(normalisers))
        ctx.chunk_size = chunk_size
        return torch.cat(logps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        """Gradients of the hidden states and (when it trains) the projection weight."""
        hidden, weight, labels, normalisers = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, len(hidden), ctx.chunk_size):
            end = start + ctx.chunk_size
            upstream = grad[start:end, None].float()
            logits = F.linear(hidden[start:end], weight).float()
            grad_logits = logits.sub_(normalisers[start:end, None]).exp_().mul_(-upstream)
            grad_logits = grad_logits.scatter_add_(1, labels[start:end, None], upstream).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden[start:end]
        return grad_hidden, grad_weight, None, None


def _fusable(lm_head: nn.Module) -> bool:
    """A plain bias-free nn.Linear with no hooks, outside multi-process runs (FSDP gathers weights in hooks)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return (type(lm_head) is nn.Linear and lm_head.bias is None and not lm_head._forward_hooks
            and not lm_head._forward_pre_hooks and not distributed)


def chunked_token_logprobs(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           chunk_size: int = 512) -> torch.Tensor:
    """log p(label) per row of `hidden` [tokens, hidden_size], float32 [tokens], lm_head applied in chunks.

    With gradients and a plain output projection, `FusedChunkedLogProbs`; otherwise each chunk
    under activation checkpointing (the same numbers).
    """
    if len(hidden) and _needs_grad(lm_head, hidden) and _fusable(lm_head):
        return FusedChunkedLogProbs.apply(hidden, lm_head.weight, labels, chunk_size)
    return chunked_over_tokens(_logprob_chunk, lm_head, chunk_size, hidden, labels)


def _kl_chunk(lm_head: nn.Module, hidden: torch.Tensor, ref_hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(lm_head(hidden).float() / temperature, dim=-1)
    log_q = F.log_softmax(lm_head(ref_hidden).float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def chunked_token_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, lm_head: nn.Module,
                     chunk_size: int = 512, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(policy || reference) over the vocabulary per token, float32 [tokens], in chunks.

    `ref_hidden` is detached: the reference is a fixed target.
    """
    fn = lambda head, h, r: _kl_chunk(head, h, r, temperature)  # noqa: E731 (binds the temperature)
    return chunked_over_tokens(fn, lm_head, chunk_size, hidden, ref_hidden.detach())


def row_sums(token_values: torch.Tensor, tokens_per_row: torch.Tensor) -> torch.Tensor:
    """Sum a flat per-token tensor back into rows, given how many tokens each row has."""
    rows = torch.repeat_interleave(torch.arange(len(tokens_per_row), device=token_values.device), tokens_per_row)
    return token_values.new_zeros(len(tokens_per_row)).index_add(0, rows, token_values)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards beta*(pi - ref) of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def k3_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - pi) - (ref - pi) - 1 (>= 0)."""
    log_ratio = ref_logps - policy_logps
    return torch.exp(log_ratio) - log_ratio - 1


class ResponseScorer(nn.Module):
    """A causal LM (usually a PeftModel) that returns log-probs of the trained tokens only.

    `forward(input_ids, attention_mask, loss_mask)` runs the backbone once, keeps the hidden
    states at positions whose next token has loss_mask 1, and returns `(token_logps, hidden)`:
    float32 [tokens] in row-major order, and the [tokens, hidden_size] states (for objectives
    that need the distribution, e.g. a full-vocabulary KL). This module is what accelerate
    wraps (DDP/FSDP), so every forward goes through the wrapper.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 512):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _base(self) -> nn.Module:
        return unwrap_peft(self.model)

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (hidden -> vocabulary logits)."""
        return self._base().get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                gather: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                host_input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self._base().get_decoder()
        tokens = {"input_ids": input_ids}
        if host_input_ids is not None and getattr(decoder.get_input_embeddings(), "host_lookup", False):
            tokens = {"inputs_embeds": decoder.get_input_embeddings()(host_input_ids)}  # no wait for the GPU
        if segments is not None:  # prefix-shared rows (see `packing`): explicit positions, mask and targets
            from character_baker.stages.training.packing import attention_mask_4d, flex_block_mask

            implementation = attention_implementation(self.model)
            if implementation == "flex_attention":
                mask = flex_block_mask(segments)
            else:
                dtype = decoder.get_input_embeddings().weight.dtype
                mask = attention_mask_4d(segments, dtype, additive=implementation == "eager")
            outputs = decoder(**tokens, attention_mask=mask, position_ids=position_ids, use_cache=False)
            hidden = outputs.last_hidden_state.reshape(-1, outputs.last_hidden_state.shape[-1])[gather]
            return chunked_token_logprobs(hidden, self.lm_head, labels, self.chunk_size), hidden
        padded = bool((attention_mask == 0).any())
        outputs = decoder(**tokens, attention_mask=attention_mask if padded else None, use_cache=False)
        trained = loss_mask[:, 1:].bool()
        hidden = outputs.last_hidden_state[:, :-1][trained]
        labels = input_ids[:, 1:][trained]
        return chunked_token_logprobs(hidden, self.lm_head, labels, self.chunk_size), hidden

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the base weights: the reference/teacher, never a second copy of the model."""
        with self.model.disable_adapter():
            yield


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(model: nn.Module) -> str:
    """The model's attention implementation ('sdpa', 'eager', 'flash_attention_2', ...), PEFT-wrapped or not."""
    config = getattr(unwrap_peft(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def tokens_per_row(loss_mask: torch.Tensor) -> torch.Tensor:
    """How many trained tokens each row contributes to the flat outputs of `ResponseScorer`."""
    return loss_mask[:, 1:].sum(1)
