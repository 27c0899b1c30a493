"""The `profile` stage: which residual-stream dimensions the persona moves, per layer.

For prompts drawn across the categories of the prompt set, the base model answers twice:

- persona on: the constitution's teacher system prompt, and the in-character answer it writes;
- persona off: no system prompt, and the assistant-style answer it writes.

Each sequence then runs through the model's decoder stack once (no output head) with forward
hooks on every decoder layer (and, with `profile.include_mlp`, on the MLP's neuron activations,
the input of `down_proj`); each hook averages its layer's output over the answer's tokens only
(never the prompt, never padding). The per-prompt vectors feed streaming statistics and are
dropped: memory is O(layers x hidden), whatever the number of prompts.

From the statistics, per layer and dimension: the z-score of the difference
`(mean_on - mean_off) / sqrt((var_on + var_off) / 2)`; the push set (z > +threshold, published
+2) and pull set (z < -threshold); a layer whose set is empty falls back to its top N dimensions
of that sign (published 50); layer importance = root-mean-square z; steering vectors per layer,
the mean difference and its first principal component (see `stats`). `report` writes the files.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from character_baker.backends.steering import backbone, decoder_layers, layer_hidden, response_mean
from character_baker.core.config import ProfileConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import read_jsonl
from character_baker.core.stage import StageContext, StageResult
from character_baker.core.system_prompts import persona_system_prompt
from character_baker.stages.profiling.stats import RunningMoments, TopComponentSketch

PROMPTS_FILE = "data/prompts.jsonl"


# ----------------------------------------------------------------------------- inputs
def draw_prompts(records: Sequence[dict], count: int, seed: int) -> list[dict]:
    """`count` prompts taken round-robin across categories (seeded), preferring prompts without a persona hint."""
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_category[record.get("category", "")].append(record)
    for items in by_category.values():
        rng.shuffle(items)
        items.sort(key=lambda record: bool(record.get("hint")))  # stable: unhinted first, shuffled within
    chosen: list[dict] = []
    while len(chosen) < count and any(by_category.values()):
        for category in sorted(by_category):
            if by_category[category] and len(chosen) < count:
                chosen.append(by_category[category].pop(0))
    return chosen


@dataclass(frozen=True)
class ProfiledPair:
    """One prompt's two sequences: token ids and where the answer starts (answer = ids[start:])."""

    id: str
    on_ids: tuple[int, ...]
    on_start: int
    off_ids: tuple[int, ...]
    off_start: int


def build_pairs(tokenizer: Any, system_prompt: str, prompts: Sequence[dict], on_answers: Sequence[str],
                off_answers: Sequence[str]) -> tuple[list[ProfiledPair], int]:
    """Prompt tokens (chat template) + answer tokens, persona on and off; (pairs, dropped: an empty answer)."""
    from character_baker.backends.generation.base import encode_prompt

    pairs, dropped = [], 0
    for prompt, on_answer, off_answer in zip(prompts, on_answers, off_answers):
        on_tokens = tokenizer(on_answer, add_special_tokens=False)["input_ids"]
        off_tokens = tokenizer(off_answer, add_special_tokens=False)["input_ids"]
        if not on_tokens or not off_tokens:
            dropped += 1
            continue
        user = {"role": "user", "content": prompt["prompt"]}
        on_prompt = encode_prompt(tokenizer, [{"role": "system", "content": system_prompt}, user])
        off_prompt = encode_prompt(tokenizer, [user])
        pairs.append(ProfiledPair(prompt["id"], tuple(on_prompt + on_tokens), len(on_prompt),
                                  tuple(off_prompt + off_tokens), len(off_prompt)))
    return pairs, dropped


# ----------------------------------------------------------------------------- hooks
class ResponseMeanRecorder:
    """Forward hooks recording, per decoder layer, each row's mean over its answer tokens.

    Use as a context manager; set `mask` ([rows, seq], 1 on answer tokens) before each forward,
    then `take()` the [rows, layers, hidden] residual means (and [rows, layers, intermediate]
    MLP means when `include_mlp`).
    """

    def __init__(self, model: nn.Module, include_mlp: bool = False):
        self.layers = decoder_layers(model)
        self.include_mlp = include_mlp
        self.mask: torch.Tensor | None = None
        self._residual: dict[int, torch.Tensor] = {}
        self._mlp: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _residual_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._residual[index] = response_mean(layer_hidden(output), self.mask)

        return hook

    def _mlp_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:  # the input of down_proj: the neuron activations
            self._mlp[index] = response_mean(inputs[0], self.mask)

        return hook

    def __enter__(self) -> "ResponseMeanRecorder":
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._residual_hook(index)))
            if self.include_mlp:
                projection = _mlp_down_projection(layer, index)
                self._handles.append(projection.register_forward_pre_hook(self._mlp_hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The recorded means of the last forward, [rows, layers, dim], on the CPU."""
        residual = torch.stack([self._residual[i] for i in range(len(self.layers))], dim=1).cpu()
        mlp = torch.stack([self._mlp[i] for i in range(len(self.layers))], dim=1).cpu() if self.include_mlp else None
        self._residual, self._mlp = {}, {}
        return residual, mlp


def _mlp_down_projection(layer: nn.Module, index: int) -> nn.Module:
    projection = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if projection is None:
        raise UserError.single("recipe", "profile.include_mlp", f"decoder layer {index} has no mlp.down_proj to hook",
                               "set profile.include_mlp=false for this architecture")
    return projection


# ----------------------------------------------------------------------------- streaming pass
@dataclass
class ProfileAccumulator:
    """Streaming statistics of the per-prompt means, persona on and off, and of their differences."""

    on: RunningMoments = field(default_factory=RunningMoments)
    off: RunningMoments = field(default_factory=RunningMoments)
    differences: TopComponentSketch = field(default_factory=TopComponentSketch)
    mlp_on: RunningMoments = field(default_factory=RunningMoments)
    mlp_off: RunningMoments = field(default_factory=RunningMoments)

    def update(self, on: torch.Tensor, off: torch.Tensor, mlp_on: torch.Tensor | None = None,
               mlp_off: torch.Tensor | None = None) -> None:
        """Fold one batch of paired per-prompt means [rows, layers, dim] into the statistics."""
        self.on.update(on)
        self.off.update(off)
        self.differences.update(on - off)
        if mlp_on is not None and mlp_off is not None:
            self.mlp_on.update(mlp_on)
            self.mlp_off.update(mlp_off)


def _padded(rows: Sequence[tuple[Sequence[int], int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and answer mask for (ids, answer start) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (tokens, start) in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
        answer[row, start:len(tokens)] = 1
    return ids.to(device), attention.to(device), answer


def _record(model: nn.Module, recorder: ResponseMeanRecorder, rows: Sequence[tuple[Sequence[int], int]],
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    ids, attention, answer = _padded(rows, pad_id, device)
    recorder.mask = answer.to(device, torch.float32)
    backbone(model)(input_ids=ids, attention_mask=attention, use_cache=False)
    return recorder.take()


@torch.no_grad()
def profile_activations(model: nn.Module, pairs: Sequence[ProfiledPair], *, pad_id: int, batch_size: int = 8,
                        include_mlp: bool = False) -> ProfileAccumulator:
    """Run every pair through the decoder stack (persona on, then off) and accumulate the statistics."""
    accumulator = ProfileAccumulator()
    was_training = model.training
    model.eval()
    try:
        with ResponseMeanRecorder(model, include_mlp) as recorder:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                on, mlp_on = _record(model, recorder, [(p.on_ids, p.on_start) for p in chunk], pad_id)
                off, mlp_off = _record(model, recorder, [(p.off_ids, p.off_start) for p in chunk], pad_id)
                accumulator.update(on, off, mlp_on, mlp_off)
    finally:
        model.train(was_training)
    return accumulator


# ----------------------------------------------------------------------------- analysis
def z_scores(mean_on: torch.Tensor, mean_off: torch.Tensor, var_on: torch.Tensor,
             var_off: torch.Tensor) -> torch.Tensor:
    """(mean_on - mean_off) / pooled standard deviation, per dimension (0 where both variances are 0)."""
    pooled = ((var_on + var_off) / 2).sqrt()
    difference = mean_on - mean_off
    return torch.where(pooled > 0, difference / pooled.clamp(min=1e-30), torch.zeros_like(difference))


def select_dimensions(z: torch.Tensor, threshold: float, top_n: int, sign: int) -> tuple[torch.Tensor, list[int]]:
    """(mask [layers, dim] of sign*z > threshold, fallback layers): a layer with none takes its top_n of that sign."""
    signed = z * sign
    mask = signed > threshold
    fallback = []
    for layer in range(z.shape[0]):
        if mask[layer].any():
            continue
        fallback.append(layer)
        values, indices = signed[layer].topk(min(top_n, z.shape[1]))
        mask[layer, indices[values > 0]] = True
    return mask, fallback


def analyse(accumulator: ProfileAccumulator, cfg: ProfileConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The profile tensors (`backends.steering.PROFILE_KEYS`) and facts for the summary."""
    on, off = accumulator.on, accumulator.off
    z = z_scores(on.mean, off.mean, on.variance, off.variance)
    push, push_fallback = select_dimensions(z, cfg.z_threshold, cfg.top_n_fallback, +1)
    pull, pull_fallback = select_dimensions(z, cfg.z_threshold, cfg.top_n_fallback, -1)
    mean_diff = on.mean - off.mean
    component = accumulator.differences.first_component()
    tensors = {"mean_on": on.mean, "mean_off": off.mean, "var_on": on.variance, "var_off": off.variance, "z": z,
               "push": push, "pull": pull, "importance": z.pow(2).mean(-1).sqrt(),
               "layer_scale": (off.mean.pow(2) + off.variance).mean(-1).sqrt(), "steer_mean_diff": mean_diff,
               # The projection of the mean difference on the component: right sign and natural scale.
               "steer_pca": (component * mean_diff).sum(-1, keepdim=True) * component,
               "pca_explained": accumulator.differences.explained()}
    if accumulator.mlp_on.count:
        mlp_on, mlp_off = accumulator.mlp_on, accumulator.mlp_off
        tensors.update(mlp_mean_on=mlp_on.mean, mlp_mean_off=mlp_off.mean,
                       mlp_z=z_scores(mlp_on.mean, mlp_off.mean, mlp_on.variance, mlp_off.variance))
    tensors = {key: value.to(torch.uint8) if value.dtype == torch.bool else value.float()
               for key, value in tensors.items()}
    return tensors, {"prompts": on.count, "push_fallback_layers": push_fallback, "pull_fallback_layers": pull_fallback}


# ----------------------------------------------------------------------------- the stage
def answer_prompts(backend: Any, prompts: Sequence[dict], system_prompt: str, on_sampling: Any,
                   off_sampling: Any) -> tuple[list[str], list[str], int]:
    """In-character answers (system prompt) and assistant-style answers (none) to each prompt; (on, off, tokens)."""
    users = [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts]
    on = backend.generate([[{"role": "system", "content": system_prompt}, *user] for user in users], on_sampling,
                          progress="profile: persona on")
    off = backend.generate(users, off_sampling, progress="profile: persona off")
    tokens = sum(row[0].completion_tokens for row in on + off)
    return [row[0].text for row in on], [row[0].text for row in off], tokens


def _backend(ctx: StageContext, model: nn.Module, tokenizer: Any) -> Any:
    from character_baker.backends.generation import CachedBackend
    from character_baker.backends.generation.hf import HFBackend

    gen = ctx.recipe.generation
    backend = HFBackend(model, tokenizer, batch_size=gen.teacher.batch_size, model_id=str(ctx.recipe.models.base))
    return CachedBackend(backend, ctx.run.path("cache")) if gen.cache else backend


def run(ctx: StageContext) -> StageResult:
    """Answer, record, analyse and write profile/ (tensors, summary, heatmap)."""
    from character_baker.backends.models import load_model
    from character_baker.stages.profiling import report

    cfg, gen = ctx.recipe.profile, ctx.recipe.generation
    records = read_jsonl(ctx.run.path(PROMPTS_FILE))
    if len(records) < 2:
        raise UserError.single(str(ctx.run.path(PROMPTS_FILE)), "prompts", "the profile needs a prompt set",
                               "run `character-baker profile` (it builds the prompts first) or the prompts stage")
    prompts = draw_prompts(records, cfg.prompts, cfg.seed)
    model, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    system_prompt = persona_system_prompt(ctx.constitution, ctx.recipe.generation.persona_prompt)
    on, off, tokens = answer_prompts(_backend(ctx, model, tokenizer), prompts, system_prompt,
                                     gen.teacher.sampling, gen.student.sampling)
    pairs, dropped = build_pairs(tokenizer, system_prompt, prompts, on, off)
    if len(pairs) < 2:
        raise UserError.single("recipe", "profile.prompts", f"only {len(pairs)} prompt(s) got two non-empty answers",
                               "raise profile.prompts or generation max_new_tokens")
    ctx.log(f"[profile] recording {len(pairs)} prompts x 2 conditions ({dropped} dropped: empty answer)")
    accumulator = profile_activations(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size,
                                      include_mlp=cfg.include_mlp)
    tensors, facts = analyse(accumulator, cfg)
    metadata = {"model": str(ctx.recipe.models.base), "constitution": ctx.constitution.content_hash(),
                "z_threshold": cfg.z_threshold, "top_n_fallback": cfg.top_n_fallback, "dropped_empty": dropped, **facts}
    summary = report.write_profile(ctx.run, tensors, metadata, heatmap_dims=cfg.heatmap_dims)
    return StageResult("profile", artifacts=list(report.ARTIFACTS), summary=report.headline(summary),
                       tokens_generated=tokens)
