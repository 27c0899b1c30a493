"""SDFT: on-policy self-distillation of the persona prompt into a LoRA adapter.

    teacher = the base weights (adapter off) + the constitution's teacher system prompt
    student = the same weights with the adapter on, no system prompt

Each micro-batch, the student samples answers to its prompts with the generation backend
(`HFBackend` on the very model being trained, adapter on, eval mode, no gradients; sampling as
`generation.student.sampling`). The teacher scores the same answer tokens under no_grad, after
its own system prompt; the loss per answer token is a divergence between the two next-token
distributions at temperature `sdft.temperature` (TRL GKD's convention: logits / T, no T^2):

    reverse_kl (default)  KL(student || teacher) = sum_v p_s (log p_s - log p_t)   mode-seeking
    forward_kl            KL(teacher || student) = sum_v p_t (log p_t - log p_s)   mass-covering
    jsd                   (KL(p_s || m) + KL(p_t || m)) / 2 with m = (p_s + p_t) / 2

averaged over each answer's tokens, then over prompts. With `sdft.ce_coef` > 0 the student also
learns, by cross-entropy, the teacher's own answers (sampled once before training, adapter
off + system prompt, cached in data/sdft_teacher.jsonl), averaged over their tokens:

    loss = kl_coef * divergence + ce_coef * CE          (reported: 0.3 x KL + 1.0 x CE at T = 2)

Student rows (on-policy answers, then teacher answers) run in one forward; only the hidden
states of answer tokens are kept, and `lm_head` runs on `logprob_chunk_size` tokens at a time for
both models, so no [batch, seq, vocab] tensor ever exists (see `losses`). Everything else, the
loop, checkpoints, resume, logs (logs/sdft.jsonl: the divergence under its own name, e.g.
`reverse_kl`, `ce_loss`, `sample_tokens`, `truncated`), is the shared trainer's.
Under FSDP the student cannot sample from sharded weights: use one process or DDP.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from character_baker.core.config import SamplingConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, read_jsonl, stable_hash, write_jsonl_atomic
from character_baker.core.stage import StageContext, StageResult
from character_baker.core.system_prompts import persona_system_prompt
from character_baker.stages.training.batching import Batch, collate_sequences
from character_baker.stages.training.losses import chunked_over_tokens, row_sums, tokens_per_row
from character_baker.core.heldout import held_out_prompts
from character_baker.core.persona_scorer import RUN_FILE as SCORER_FILE
from character_baker.stages.training.monitor import build_monitor
from character_baker.stages.training.push_pull import balance_callbacks, push_pull_losses
from character_baker.stages.training.tokenize import TokenizedSequence, render_ids, tokenize_conversation
from character_baker.stages.training.trainer import run_training, sum_counts, training_summary

Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
PROMPTS_FILE = "data/prompts.jsonl"
TEACHER_FILE = "data/sdft_teacher.jsonl"
ADAPTER_NAME = "default"  # the name attach_lora gives the trained adapter


# ----------------------------------------------------------------------------- the loss
def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence [tokens] between next-token distributions given as logits [tokens, vocab]."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
    raise ValueError(f"unknown divergence {kind!r}: use reverse_kl, forward_kl or jsd")


def chunked_divergence(hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: nn.Module, kind: Divergence,
                       temperature: float = 1.0, chunk_size: int = 512) -> torch.Tensor:
    """`token_divergence` from hidden states [tokens, hidden], lm_head applied `chunk_size` tokens at a time."""
    def fn(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = head.weight.dtype  # hidden states may arrive upcast to float32; bf16 heads need bf16 inputs
        return token_divergence(head(h.to(dtype)), head(t.to(dtype)), kind, temperature)

    return chunked_over_tokens(fn, lm_head, chunk_size, hidden, teacher_hidden.detach())


# ----------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class SdftExample:
    """One prompt: its student and teacher prompt tokens, and (for CE) the teacher's tokenised answer."""

    id: str
    prompt: str
    student_prompt: tuple[int, ...]
    teacher_prompt: tuple[int, ...]
    teacher_answer: TokenizedSequence | None = None

    def __len__(self) -> int:
        return len(self.student_prompt) + (len(self.teacher_answer) if self.teacher_answer else 0)


def build_examples(tokenizer: Any, prompts: Sequence[dict], system_prompt: str, teacher_answers: dict[str, str],
                   max_length: int, max_new_tokens: int) -> tuple[list[SdftExample], int]:
    """(examples, dropped): prompts whose student prompt + max_new_tokens and teacher answer fit max_length."""
    examples, dropped = [], 0
    for prompt in prompts:
        user = {"role": "user", "content": prompt["prompt"]}
        student_prompt = tuple(render_ids(tokenizer, [user], add_generation_prompt=True))
        answer = teacher_answers.get(prompt["id"], "").strip()
        sequence = (tokenize_conversation(tokenizer, [user, {"role": "assistant", "content": answer}], prompt["id"],
                                          last_turn_only=True) if answer else None)
        if len(student_prompt) + max_new_tokens > max_length or (sequence and len(sequence) > max_length):
            dropped += 1
            continue
        teacher_prompt = tuple(render_ids(tokenizer, [{"role": "system", "content": system_prompt}, user],
                                          add_generation_prompt=True))
        examples.append(SdftExample(prompt["id"], prompt["prompt"], student_prompt, teacher_prompt, sequence))
    return examples, dropped


def answer_rows(tokenizer: Any, example: SdftExample, answer: str) -> tuple[TokenizedSequence, TokenizedSequence]:
    """(student row, teacher row): the same answer tokens after the student's and the teacher's prompt."""
    user = {"role": "user", "content": example.prompt}
    student = tokenize_conversation(tokenizer, [user, {"role": "assistant", "content": answer}], example.id,
                                    last_turn_only=True)
    start = len(example.student_prompt)
    teacher = TokenizedSequence(example.id, example.teacher_prompt + student.input_ids[start:],
                                (0,) * len(example.teacher_prompt) + student.loss_mask[start:])
    return student, teacher


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- the objective
@dataclass
class SdftObjective:
    """On-policy self-distillation (see the module docstring) as an `Objective` for the shared trainer."""

    tokenizer: Any
    sampling: SamplingConfig
    divergence: Divergence = "reverse_kl"
    temperature: float = 1.0
    kl_coef: float = 1.0
    ce_coef: float = 0.0
    chunk_size: int = 512
    sample_batch_size: int = 64
    name: str = "sdft"
    _backend: Any = field(default=None, repr=False)
    _draws: int = field(default=0, repr=False)

    def counts(self, example: SdftExample) -> dict[str, float]:
        """A prompt counts once; its teacher answer's tokens count toward the CE mean."""
        ce_tokens = example.teacher_answer.num_loss_tokens if example.teacher_answer and self.ce_coef else 0
        return {"prompts": 1.0, "teacher_tokens": float(ce_tokens)}

    def prepare(self, model: nn.Module, dataset: Sequence[SdftExample], run_dir: RunDir) -> dict[str, Any]:
        """Build the student's sampler: an HFBackend on the model being trained (adapter on)."""
        from accelerate.utils import extract_model_from_parallel

        from character_baker.backends.generation.hf import HFBackend

        peft_model = extract_model_from_parallel(model).model
        with _eval_mode(peft_model):
            self._backend = HFBackend(peft_model, self.tokenizer, batch_size=self.sample_batch_size)
        return {"prompts": len(dataset), "with_teacher_answer": sum(e.teacher_answer is not None for e in dataset)}

    def sample(self, examples: Sequence[SdftExample]) -> list[Any]:
        """One on-policy answer per example from the student (adapter on, no system prompt)."""
        self._draws += 1
        seed = int(stable_hash([self.sampling.seed, self._draws, [e.id for e in examples]]), 16) % 2**31
        conversations = [[{"role": "user", "content": example.prompt}] for example in examples]
        with _eval_mode(self._backend.model):
            outputs = self._backend.generate(conversations, self.sampling.model_copy(update={"seed": seed}),
                                             adapter=ADAPTER_NAME)
        return [row[0] for row in outputs]

    def collate(self, examples: Sequence[SdftExample], pad_token_id: int) -> Batch:
        """Sample answers, then rows [student answers..., teacher answers for CE...] and the teacher's rows."""
        answers = self.sample(examples)
        rows = [answer_rows(self.tokenizer, example, answer.text) for example, answer in zip(examples, answers)]
        ce_rows = [e.teacher_answer for e in examples if e.teacher_answer is not None] if self.ce_coef else []
        batch = collate_sequences([student for student, _ in rows] + ce_rows, pad_token_id)
        teacher = collate_sequences([teacher for _, teacher in rows], pad_token_id)
        batch.ids = [example.id for example in examples]
        batch.extras = {"teacher_input_ids": teacher.input_ids, "teacher_attention_mask": teacher.attention_mask,
                        "teacher_loss_mask": teacher.loss_mask,
                        "truncated": torch.tensor([float(a.finish_reason == "length") for a in answers])}
        batch.counts = sum_counts([self.counts(example) for example in examples])
        return batch

    @torch.no_grad()
    def teacher_hidden(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The teacher's hidden states at the answer tokens: adapter off, system prompt, no gradients."""
        from accelerate.utils import extract_model_from_parallel

        with extract_model_from_parallel(model).adapter_disabled():
            _, hidden = model(batch.extras["teacher_input_ids"], batch.extras["teacher_attention_mask"],
                              batch.extras["teacher_loss_mask"])
        return hidden

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """kl_coef x divergence (per-token mean per prompt, mean over prompts) + ce_coef x CE on teacher answers."""
        from accelerate.utils import extract_model_from_parallel

        prompts = len(batch.ids)
        total_prompts = batch.totals.get("prompts", batch.counts["prompts"])
        teacher_hidden = self.teacher_hidden(model, batch)
        token_logps, hidden = model(batch.input_ids, batch.attention_mask, batch.loss_mask)
        per_row = tokens_per_row(batch.loss_mask)
        sampled = int(per_row[:prompts].sum())
        divergence = chunked_divergence(hidden[:sampled], teacher_hidden, extract_model_from_parallel(model).lm_head,
                                        self.divergence, self.temperature, self.chunk_size)
        per_prompt = row_sums(divergence, per_row[:prompts]) / per_row[:prompts].clamp(min=1)
        distill = per_prompt.sum() / total_prompts
        metrics = {self.divergence: distill, "sample_tokens": per_row[:prompts].sum().float() / total_prompts,
                   "truncated": batch.extras["truncated"].sum() / total_prompts,
                   "student_logp": token_logps[:sampled].sum() / total_prompts}
        loss = self.kl_coef * distill
        if self.ce_coef and len(per_row) > prompts:
            ce = -token_logps[sampled:].sum() / batch.totals.get("teacher_tokens", batch.counts["teacher_tokens"])
            loss = loss + self.ce_coef * ce
            metrics["ce_loss"] = ce
        return loss, metrics


# ----------------------------------------------------------------------------- the stage
def teacher_answers(ctx: StageContext, model: nn.Module, tokenizer: Any, prompts: Sequence[dict],
                    system_prompt: str) -> tuple[dict[str, str], int]:
    """The teacher's answers (base weights + system prompt) by prompt id, cached, written to data/sdft_teacher.jsonl."""
    from character_baker.backends.generation import CachedBackend
    from character_baker.backends.generation.hf import HFBackend

    gen, base = ctx.recipe.generation, str(ctx.recipe.models.base)
    backend = HFBackend(model, tokenizer, batch_size=gen.teacher.batch_size, model_id=base)
    backend = CachedBackend(backend, ctx.run.path("cache")) if gen.cache else backend
    conversations = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": p["prompt"]}]
                     for p in prompts]
    completions = [row[0] for row in backend.generate(conversations, gen.teacher.sampling,
                                                      progress="sdft: teacher answers")]
    provenance = {"stage": "sdft", "teacher": base, "constitution": ctx.constitution.content_hash(),
                  "sampling": gen.teacher.sampling.model_dump(mode="json")}
    records = [{"id": stable_hash({"prompt": prompt["id"], **provenance}), "prompt_id": prompt["id"],
                "messages": [{"role": "user", "content": prompt["prompt"]}], "answer": completion.text,
                "provenance": {**provenance, "finish_reason": completion.finish_reason}}
               for prompt, completion in zip(prompts, completions)]
    write_jsonl_atomic(ctx.run.path(TEACHER_FILE), records)
    answers = {prompt["id"]: completion.text for prompt, completion in zip(prompts, completions)}
    return answers, sum(completion.completion_tokens for completion in completions)


def run(ctx: StageContext) -> StageResult:
    """Sample teacher answers (for CE), then train adapters/sdft/ on-policy."""
    from character_baker.backends.models import load_model

    cfg, models = ctx.recipe.sdft, ctx.recipe.models
    records = read_jsonl(ctx.run.path(PROMPTS_FILE))
    if not records:
        raise UserError.single(str(ctx.run.path(PROMPTS_FILE)), "prompts", "SDFT needs a prompt set",
                               "run `character-baker sdft` (it builds the prompts first) or the prompts stage")
    prompts = random.Random(cfg.seed).sample(records, min(cfg.prompts, len(records)))
    regularisers = push_pull_losses(ctx.recipe, ctx.run, "sdft")  # reads the profile: fail before any work
    model, tokenizer = load_model(models.base, models)
    system_prompt = persona_system_prompt(ctx.constitution, ctx.recipe.generation.persona_prompt)
    answers, tokens = teacher_answers(ctx, model, tokenizer, prompts, system_prompt) if cfg.ce_coef else ({}, 0)
    student = ctx.recipe.generation.student
    sampling = student.sampling
    examples, dropped = build_examples(tokenizer, prompts, system_prompt, answers, cfg.max_length,
                                       sampling.max_new_tokens)
    objective = SdftObjective(tokenizer, sampling, cfg.divergence, cfg.temperature, cfg.kl_coef, cfg.ce_coef,
                              cfg.logprob_chunk_size, student.batch_size,
                              name="sdft" + "".join(f"+{r.name}" for r in regularisers))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # SDFT samples from every prompt of the run, so its monitor answers shipped prompts the run does not use.
    monitor = build_monitor(cfg.monitor, held_out_prompts(ctx.run, 0.0, cfg.seed, cfg.monitor.prompts), tokenizer,
                            ctx.run.path("adapters", "sdft"), ctx.run.path(SCORER_FILE), sampling, student.batch_size)
    summary = run_training(ctx.run, examples, model, cfg, objective, stage="sdft", pad_token_id=pad,
                           extra_losses=regularisers, callbacks=balance_callbacks(regularisers), console=ctx.console,
                           base_model=str(models.base), monitor=monitor)
    final = summary["final_metrics"]
    result = {"prompts": len(examples), "dropped_too_long": dropped, **training_summary(summary),
              "push_pull": bool(regularisers), cfg.divergence: round(final.get(cfg.divergence, float("nan")), 5),
              "adapter": "adapters/sdft"}
    artifacts = ["adapters/sdft/adapter_model.safetensors", "adapters/sdft/adapter_config.json"]
    return StageResult("sdft", artifacts=artifacts + ([TEACHER_FILE] if cfg.ce_coef else []), summary=result,
                       tokens_generated=tokens, tokens_trained=summary["tokens_trained"])
