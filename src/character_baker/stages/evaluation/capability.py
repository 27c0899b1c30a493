"""Capability retention: multiple-choice log-likelihood, lenient match on short answers, KL to the base.

- Multiple choice (the headline measure): our held-out items (`assets.multiple_choice_items`:
  knowledge, arithmetic, commonsense, reading) scored the lm-evaluation-harness way by
  `backends.scoring` with the condition's system prompt and adapter: `mc_accuracy` (summed
  log-likelihood, the harness's `acc`) and `mc_accuracy_norm` (divided by the choice's length in
  characters, `acc_norm`), each with n and a Wilson interval, per category with its chance rate.
  Needs the condition's model in-process (hf backend, not steered).
- Lenient match (generative): each short-answer item is asked with "Answer with just the answer."
  and answered greedily; `lenient_match` reads the first number of the reply for numeric answers,
  the first yes/no for yes/no answers, and otherwise looks for the answer (or an alias) as a whole
  word: a persona that wraps the answer in its voice ("Arr, 'tis 1,295!") still gets it right.
- KL: the condition answers neutral prompts; on each answer's tokens the per-token
  KL(p_condition || p_base) over the whole vocabulary is averaged (nats per token), p_condition
  reading the condition's context (its system prompt, adapter) and p_base the plain prompt with
  the base weights. Hidden states are kept, vocabulary-wide logits exist only `eval.kl_chunk_size`
  tokens at a time. Needs both conditions in-process (hf backend) with the same vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core.answers import is_lenient_match
from character_baker.core.stats import mean_estimate, proportion

if TYPE_CHECKING:
    import torch

    from character_baker.core.config import SamplingConfig
    from character_baker.stages.evaluation.conditions import Condition

ANSWER_INSTRUCTION = "Answer with just the answer."
def capability_conversation(item: dict) -> list[dict[str, str]]:
    """The item's question with the short-answer instruction."""
    return [{"role": "user", "content": f"{item['question']}\n{ANSWER_INSTRUCTION}"}]


def measure_lenient_match(condition: "Condition", items: Sequence[dict], sampling: "SamplingConfig") -> dict[str, Any]:
    """Lenient match of one condition's greedy short answers, with n and a Wilson interval."""
    replies = [c.text for c in condition.answer([capability_conversation(i) for i in items], sampling,
                                                 label="capability items")]
    return proportion(sum(is_lenient_match(r, i) for r, i in zip(replies, items)), len(items)).to_dict()


def measure_multiple_choice(condition: "Condition", items: Sequence[dict], batch_size: int) -> dict[str, Any]:
    """MC accuracy (sum and length-normalised) of one condition, overall and per category; a note when unavailable."""
    from character_baker.backends.scoring import mc_accuracy, score_multiple_choice

    local = condition.local_model()
    if local is None:
        return {"mc_accuracy": {"value": None, "n": 0, "ci": None}, "mc_accuracy_norm": {"value": None, "n": 0,
                "ci": None}, "note": "needs the model in-process (hf backend, not steered)"}
    if not items:
        return mc_accuracy([])
    model, tokenizer = local
    results = score_multiple_choice(model, tokenizer, items, system_prompt=condition.system_prompt,
                                    adapter=condition.adapter, batch_size=batch_size)
    return mc_accuracy(results)


# ----------------------------------------------------------------------------- KL to the base model
def _answer_hidden(condition: "Condition", prompt_ids: list[int], answer_ids: list[int]) -> "torch.Tensor":
    """Hidden states at the positions that predict each answer token ([answer tokens, hidden])."""
    import torch

    from character_baker.backends.steering import backbone

    with condition.weights() as model:
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([prompt_ids + answer_ids], device=device)
        hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    return hidden[len(prompt_ids) - 1:-1]


def _chunk_log_probs(condition: "Condition", hidden: "torch.Tensor") -> "torch.Tensor":
    """Full-vocabulary log-probs of a chunk of hidden states under the condition's weights."""
    import torch

    with condition.weights() as model:
        return torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)


def answer_kl(condition: "Condition", base: "Condition", messages: list[dict[str, str]], answer: str,
              chunk_size: int) -> float | None:
    """Mean per-token KL(condition || base) over `answer`'s tokens (nats/token); None for an empty answer."""
    import torch

    from character_baker.backends.generation.base import encode_prompt

    _, tokenizer = condition.local_model()
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not answer_ids:
        return None
    with torch.inference_mode():
        hidden_p = _answer_hidden(condition, encode_prompt(tokenizer, condition.conversation(messages)), answer_ids)
        hidden_q = _answer_hidden(base, encode_prompt(tokenizer, base.conversation(messages)), answer_ids)
        total = 0.0
        for start in range(0, len(answer_ids), chunk_size):
            log_p = _chunk_log_probs(condition, hidden_p[start:start + chunk_size])
            log_q = _chunk_log_probs(base, hidden_q[start:start + chunk_size])
            total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / len(answer_ids)


def kl_unavailable_reason(condition: "Condition", base: "Condition") -> str | None:
    """Why KL(condition || base) cannot be computed, or None when it can."""
    local, base_local = condition.local_model(), base.local_model()
    if local is None or base_local is None:
        return "needs both models in-process (hf backend, not steered)"
    if local[1].get_vocab() != base_local[1].get_vocab():
        return "the condition's vocabulary differs from the base model's"
    return None


def measure_kl(condition: "Condition", base: "Condition", prompts: Sequence[dict], sampling: "SamplingConfig",
               chunk_size: int) -> dict[str, Any]:
    """Mean over answers of the per-token KL(condition || base), with n and a normal interval."""
    if condition is base:
        return {"value": 0.0, "n": len(prompts), "ci": [0.0, 0.0], "note": "reference"}
    reason = kl_unavailable_reason(condition, base)
    if reason:
        return {"value": None, "n": 0, "ci": None, "note": reason}
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    answers = condition.answer(conversations, sampling, label="neutral prompts (KL)")
    values = [answer_kl(condition, base, messages, answer.text, chunk_size)
              for messages, answer in zip(conversations, answers)]
    return mean_estimate([v for v in values if v is not None]).to_dict()
