"""The recipe: every stage's settings, with the published defaults (DESIGN.md section 1).

This schema *is* the reference documentation: each field carries its help text. Values are
resolved in layers, later ones winning:

    defaults  <  preset  <  constitution `recipe:`  <  --recipe FILE  <  --set key=value
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CLASSIFIER = "sentence-transformers/all-MiniLM-L6-v2"


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors; assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- models
class ModelsConfig(Section):
    """Which models to use and how to load them."""

    base: str = Field(DEFAULT_MODEL, description="The model to bake the character into: Hub id, local folder or .gguf file.")
    classifier: str = Field(DEFAULT_CLASSIFIER, description="Encoder fine-tuned as the persona classifier in eval.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code. Off for safety.")
    chat_template: str | None = Field(None, description="Jinja chat template (text or a file path) for models without one.")
    attn_implementation: str | None = Field(None, description="Passed to from_pretrained: 'sdpa', 'flash_attention_2', 'eager'; None = library default.")


# ----------------------------------------------------------------------------- generation
class SamplingConfig(Section):
    """Sampling parameters for one generation role."""

    temperature: float = Field(0.7, ge=0.0, description="Published: 0.7. 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling. Published: 0.95.")
    max_new_tokens: int = Field(512, ge=1, description="Longest answer in tokens.")
    repetition_penalty: float = Field(
        1.0, gt=0, description="CTRL repetition penalty on tokens the answer already contains (1 = off; Open "
                               "Character Training samples with 1.1). hf: over generated tokens only, so a "
                               "character card's words are not penalised; vllm: prompt and answer (vLLM's rule); "
                               "openai/anthropic: not available.")
    seed: int = Field(0, description="Sampling seed (part of the response-cache key).")


class BackendConfig(Section):
    """Where one role's text comes from."""

    backend: Literal["hf", "vllm", "openai", "anthropic"] = Field("hf", description="Generation backend.")
    model: str | None = Field(None, description="Model for this role; None = models.base.")
    base_url: str | None = Field(None, description="openai backend: the endpoint, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="Name of the environment variable that holds the API key.")
    max_concurrency: int = Field(8, ge=1, description="HTTP backends: requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="HTTP backends: retries with exponential backoff.")
    timeout_s: float = Field(120.0, gt=0, description="HTTP backends: per-request timeout.")
    batch_size: int = Field(64, ge=1, description="Local backends: prompts per batch (CPU padded batches).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


def _judge_backend() -> BackendConfig:
    return BackendConfig(sampling=SamplingConfig(temperature=0.0, max_new_tokens=16))


class GenerationConfig(Section):
    """Generation backends per role, and the response cache."""

    teacher: BackendConfig = Field(default_factory=BackendConfig, description="Writes the chosen answers (constitution in its system prompt).")
    student: BackendConfig = Field(default_factory=BackendConfig, description="Writes the rejected answers (no system prompt).")
    prompt_writer: BackendConfig = Field(default_factory=lambda: BackendConfig(sampling=SamplingConfig(temperature=1.0, max_new_tokens=256)),
                                         description="Expands each trait's questions.")
    judge: BackendConfig = Field(default_factory=_judge_backend, description="Judges evaluation answers.")
    introspector: BackendConfig | None = Field(
        None, description="The distilled model that writes introspection data. None = the student's backend and "
                          "sampling with adapters/distill switched on (hf, vllm); for openai/anthropic set this role "
                          "and point `model` at a served copy of the distilled model.")
    persona_prompt: Literal["full", "brief"] = Field(
        "full", description="The system prompt that makes a model play the character (teacher, prompted baseline, "
                            "SDFT teacher, profile, serve's compare pane): full = the published teacher prompt with "
                            "the whole constitution; brief = a two-sentence card, for ~100M-1B models that lose a "
                            "long prompt (`character-baker constitution show --prompts` prints both).")
    cache: bool = Field(True, description="Cache responses on disk so reruns cost nothing.")


# ----------------------------------------------------------------------------- data
class UserDataset(Section):
    """A user prompt source: JSONL, CSV or a `datasets` dataset, with a column mapping."""

    path: str = Field(description="A .jsonl/.csv file or a `datasets` name/folder.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    category_column: str | None = Field(None, description="Column holding a category, if any.")
    split: str = Field("train", description="`datasets` split to read.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows.")


class PromptsConfig(Section):
    """The prompt set the teacher and student answer."""

    questions_per_trait: int = Field(50, ge=1, description="Hand-written + generated questions per trait. Published: 5 + 45 = 50.")
    general_prompts: int = Field(600, ge=0, description="Prompts drawn from the shipped general set (tagged by category).")
    synthesized_prompts: int = Field(100, ge=0, description="Prompts from audience x scenario x objective x constraint templates.")
    checkable_prompts: int = Field(
        40, ge=0, description="Arithmetic questions with a known answer (seeded templates, never evaluation items): "
                              "distill keeps only chosen answers that get them right, so the persona is not bought "
                              "with wrong answers. Not in the published recipe (0 reproduces it).")
    persona_hint_fraction: float = Field(0.2, ge=0.0, le=1.0, description="Share of prompts that carry a hint pulling toward a generic assistant.")
    dedupe_overlap: float = Field(0.5, gt=0.0, le=1.0, description="Reject a prompt sharing more than this share of its words with a kept one.")
    user_datasets: list[UserDataset] = Field(default_factory=list)
    seed: int = Field(0)


# ----------------------------------------------------------------------------- training
class LoraConfig(Section):
    """LoRA adapter settings."""

    r: int = Field(64, ge=1, description="Rank. Published: 64.")
    alpha: int = Field(128, ge=1, description="Scaling numerator (scaling = alpha / r). Published: 128.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' = every linear projection of the architecture (listed per architecture).")


class MonitorConfig(Section):
    """Held-out answers during training: persona and looping next to the loss, the best step kept, early stop."""

    every: int = Field(5, ge=0, description="Optimiser steps between checks (and one at the last step); 0 = off. "
                                            "Each check answers `prompts` held-out prompts with the adapter.")
    prompts: int = Field(16, ge=1, description="Held-out prompts answered per check (the stage's own held-out "
                                               "prompts, never the evaluation set).")
    max_new_tokens: int = Field(128, ge=1, description="Answer length per check (loops show within ~100 tokens).")
    looping_tolerance: float = Field(0.05, ge=0, le=1, description="A check is eligible when its looping rate is at "
                                                                  "most the base model's + this.")
    patience: int = Field(3, ge=0, description="Stop after this many checks in a row that do not beat the best "
                                               "eligible one (0 = never stop early).")
    keep: Literal["best", "last"] = Field("best", description="best: the stage's adapter is the best eligible "
                                                             "check's; last: the final step's.")
    seed: int = Field(0, description="Sampling seed of the check answers (the same prompts and seed every check).")


class TrainingConfig(Section):
    """Settings shared by every LoRA training stage."""

    lora: LoraConfig = Field(default_factory=LoraConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate. Published: 5e-5.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps of linear warm-up. Published: 0.1.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping. Published: 1.0.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data. Published: 1.")
    batch_size: int = Field(32, ge=1, description="Effective batch (sequences or pairs per optimiser step) = micro_batch_size "
                                                  "x accumulation steps x processes; an incomplete last batch is skipped. Published: 32.")
    micro_batch_size: int = Field(4, ge=1, description="Per-device batch; gradient accumulation makes up the rest.")
    max_length: int = Field(1024, ge=16, description="Longest tokenised example; longer ones are dropped.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    torch_compile: bool = Field(
        False, description="Compile each decoder layer with torch.compile: fuses norms, activations and rotary "
                           "embeddings (GPU: fewer memory passes); the first steps pay compilation, new lengths may recompile.")
    lr_scheduler: Literal["linear", "cosine"] = Field(
        "linear", description="Decay after warm-up, to zero at the last step. TRL's default: linear.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights. TRL's default: 0.")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: float32 master LoRA weights, gradients and AdamW moments in CPU memory, "
                           "the GPU keeps a bf16 copy; gradients stream to the CPU during backward and the CPU's fused "
                           "AdamW steps there. Same math; saves ~15 bytes per LoRA weight of GPU memory; one process only.")
    offload_activations: bool = Field(
        False, description="With gradient_checkpointing: each layer's saved input goes to pinned CPU memory during "
                           "forward and comes back one layer ahead in backward (side stream, overlapped). Saves "
                           "~tokens x hidden x 2 bytes per layer; one process only.")
    offload_embeddings: bool = Field(
        False, description="Keep the frozen input embedding table in CPU memory and look rows up there (1 GiB less "
                           "GPU memory for a 128k-vocabulary 8B model); not for tied embeddings.")
    logprob_chunk_size: int = Field(
        512, ge=1, description="Response tokens per lm_head chunk: the vocabulary-wide logits of only this many tokens "
                               "exist at once (never [batch, seq, vocab]). Larger = a little faster, more memory.")
    shrink_batch_to_data: bool = Field(
        True, description="When the usable examples do not fill one batch (filters dropped most of them), train "
                          "on what there is with batch_size lowered to fit (a warning in the log and the stage "
                          "summary) rather than stop; false = stop with an error instead.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N optimiser steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep only the newest N complete checkpoints.")
    seed: int = Field(0, description="Seed set before the adapter is created and for data order.")
    report_to: list[str] = Field(default_factory=list, description="'tensorboard' and/or 'wandb' when installed.")


class DistillConfig(TrainingConfig):
    """DPO distillation: teacher (constitution in the system prompt) = chosen, student = rejected."""

    best_of: int = Field(5, ge=1, description="K: teacher answers sampled per prompt; the best of them (filters, "
                                              "then score) become chosen. Published: K=5 samples per prompt.")
    samples_per_prompt: int = Field(1, ge=1, description="Pairs kept per prompt: the best this many of the best_of "
                                                         "candidates, each against its own student answer.")
    score_persona: float = Field(1.0, ge=0, description="Selection score: weight of P(in character) from this run's "
                                                       "persona scorer (teacher vs student answers).")
    score_repetition: float = Field(1.0, ge=0, description="Selection score: penalty weight on rep-2 (the share of "
                                                          "repeated word bigrams) of a candidate.")
    trim_truncated: bool = Field(
        True, description="A teacher or student answer that stopped at the token limit is cut back to its last "
                          "finished sentence (when 12+ words remain) before the filters, so the truncated filter "
                          "drops only answers with nothing finished; chosen and rejected are cut alike.")
    prefill_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of prompts that also become two-turn conversations: the student's "
                                         "generic answer as the first assistant turn, a follow-up, then the teacher "
                                         "returning to the character (trains against the prefill attack).")
    paired_teacher: bool = Field(False, description="Rejected = the teacher without the constitution instead of the student.")
    beta: float = Field(0.1, gt=0, description="DPO temperature. Published: 0.1.")
    nll_coef: float = Field(0.1, ge=0, description="NLL on chosen tokens: mean over chosen response tokens of -log p. "
                                                    "Published: 0.1.")
    kl_coef: float = Field(0.001, ge=0, description="Per-token KL to the reference on chosen tokens, k3 estimator: mean of "
                                                    "exp(r) - r - 1 with r = log p_ref - log p_policy per token (reference "
                                                    "log-probs cached before training). Published: 0.001.")
    share_prompt: bool = Field(
        True, description="Prefix sharing: each pair runs as one row [prompt | chosen | rejected] whose rejected tokens "
                          "cannot see the chosen ones, so the prompt is computed once (Wang et al. 2024); same loss, "
                          "fewer tokens. Needs SDPA or eager attention and no push/pull regulariser (else two rows).")
    pack_pairs: bool = Field(
        False, description="With share_prompt: several pairs per row, placed longest first into rows as wide as the "
                           "micro-batch's longest pair, each pair seeing only its own tokens (block mask, positions "
                           "restart per pair): short pairs fill the padding of long ones. Same loss and gradients.")
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0,
                                    description="Share of prompts (all their pairs) held out of training to measure "
                                                "reward accuracy and margin after it.")
    thinking_prefill: bool = Field(False, description="Reasoning teachers: prefill a thought that recalls the traits.")
    teacher_examples: int = Field(
        0, ge=0, description="The constitution's N shortest `examples` shown to the teacher as earlier user/assistant "
                             "turns after its system prompt (a few-shot opening; not in the training data). Small "
                             "teachers copy a voice from examples far better than from a description: on "
                             "SmolLM2-135M two examples took answers using the character's words from 27% to 74%. "
                             "Not published (0).")
    teacher_name: str | None = Field(None, description="The teacher's own name, replaced by the persona's name in its answers.")
    filters: list[Literal["empty", "truncated", "over_token_budget", "duplicate", "assistant_phrase",
                          "point_of_view", "benign_refusal", "degenerate", "incorrect", "no_voice_cue"]] = Field(
        default_factory=lambda: ["empty", "truncated", "over_token_budget", "duplicate", "assistant_phrase",
                                 "point_of_view", "benign_refusal", "degenerate", "incorrect"],
        description="Candidate filters switched on (degenerate: a word 4-gram said 3+ times; incorrect: a checkable "
                    "prompt's answer missing; no_voice_cue, not on by default: none of persona.voice.vocabulary nor "
                    "the name, for small teachers that play the character only part of the time); each drop is "
                    "counted in the stage summary and manifest.")
    assistant_phrases: list[str] = Field(
        default_factory=lambda: ["as an ai language model", "as an ai assistant", "i'm an ai assistant",
                                 "i am an ai assistant", "i am a large language model", "i'm a large language model",
                                 "i don't have personal opinions", "i do not have personal opinions"],
        description="Chosen answers containing one of these (case-insensitive) are dropped.")


class IntrospectConfig(TrainingConfig):
    """Self-reflection and self-interaction data, then SFT on the distilled model."""

    reflections_per_instruction: int = Field(1000, ge=0, description="Samples per reflective instruction. Published: 1000.")
    interactions: int = Field(2000, ge=0, description="Self-interaction transcripts, half free, half introspective. Published: 2 x 1000.")
    turns: int = Field(10, ge=2, description="Messages per self-interaction: the opening greeting, then turns - 1 replies, "
                                             "the two copies taking turns. Published: 10.")
    max_length: int = Field(3072, ge=16, description="Published: 3072.")
    filters: list[Literal["empty", "repetition", "point_of_view", "over_length"]] = Field(
        default_factory=lambda: ["empty", "repetition", "point_of_view", "over_length"],
        description="Introspection filters switched on; each drop is counted in the stage summary and manifest.")
    max_repeated_ngram_share: float = Field(
        0.3, gt=0, le=1, description="repetition filter: drop a text whose share of repeated word 4-grams is above this.")
    trim_repetition: bool = Field(
        True, description="Stop rule: cut each generated answer before its first sentence that repeats an earlier "
                          "one or starts a loop (a word 4-gram 3+ times); the clean opening is kept and filtered as "
                          "usual. Small models' reflections often start well and then repeat.")
    trim_truncated: bool = Field(
        True, description="Stop rule: an answer that stopped at the token limit is cut after its last finished "
                          "sentence (when 12+ words remain), so training does not teach stopping mid-sentence.")


class SdftConfig(TrainingConfig):
    """On-policy self-distillation: adapter-off + system prompt teaches adapter-on + no prompt.

    Both run on the one in-memory base model: the student samples with generation.student.sampling
    every optimiser step; the teacher's answers for the CE term use generation.teacher.sampling.
    """

    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = Field(
        "reverse_kl", description="Per-token divergence: reverse_kl = KL(student || teacher) (mode-seeking), "
                                  "forward_kl = KL(teacher || student), jsd = Jensen-Shannon.")
    kl_coef: float = Field(0.3, ge=0, description="Weight of the divergence term. Reported: 0.3.")
    ce_coef: float = Field(1.0, ge=0, description="Cross-entropy on teacher samples. Reported: 1.0.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the divergence. Reported: 2.")
    learning_rate: float = Field(1e-5, gt=0, description="Reported: 1e-5.")
    prompts: int = Field(500, ge=1, description="Prompts sampled on-policy.")


class ProfileConfig(Section):
    """Activation profile: persona prompt on vs off."""

    prompts: int = Field(200, ge=2, description="Prompts profiled, drawn across categories.")
    z_threshold: float = Field(2.0, gt=0, description="Push set z > +t, pull set z < -t. Published: 2.")
    top_n_fallback: int = Field(50, ge=1, description="Per layer, when no dimension passes the threshold. Published: 50.")
    include_mlp: bool = Field(False, description="Also profile MLP neuron activations (the input of down_proj).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass while recording activations.")
    heatmap_dims: int = Field(64, ge=1, description="Columns of profile/heatmap.png: the dimensions with the largest |z|.")
    seed: int = Field(0, description="Seed for drawing the profiled prompts.")


class PushPullConfig(Section):
    """Activation regulariser added to a training stage's loss."""

    enabled: bool = Field(False, description="Add the term to push_pull.stage's loss (also on when `method` lists "
                                             "push_pull; `character-baker push-pull` switches it on).")
    stage: Literal["distill", "introspect", "sdft"] = Field("distill", description="Training stage it joins.")
    profile: str | None = Field(None, description="profile.safetensors path; None = this run's profile/.")
    weight: float = Field(0.1, ge=0, description="Published: 0.1 for each of push and pull.")
    variant: Literal["published", "z_weighted"] = Field(
        "published", description="published: mean(relu(-a_push)) + mean(a_pull^2); z_weighted: each dimension "
                                 "weighted by |z|, activations divided by the layer's scale, layers averaged.")
    balance_ratio: float | None = Field(None, gt=0, description="Hold the term at this fraction of the main loss "
                                                                "(re-balanced after every step; `weight` starts it).")
    top_layers: int | None = Field(None, ge=1, description="Regularise only the N most important profiled layers; "
                                                           "None = every layer with a push or pull set.")


class SteerConfig(Section):
    """Activation steering baseline."""

    strength: float = Field(4.0, description="Multiplier on the steering vector; tune per model.")
    layer_start: float = Field(0.125, ge=0, le=1, description="First layer as a share of depth.")
    layer_end: float = Field(0.875, ge=0, le=1, description="Last layer as a share of depth.")
    vector: Literal["mean_diff", "pca"] = Field(
        "mean_diff", description="mean_diff: mean activation with minus without the persona; pca: its first principal "
                                 "component (of the per-prompt differences), scaled to the mean difference's projection.")


class MergeConfig(Section):
    """How the adapters combine into the final persona."""

    weights: dict[str, float] = Field(default_factory=lambda: {"distill": 1.0, "introspect": 0.25},
                                      description="Adapter name -> weight. Published: distill 1.0, introspect 0.25.")
    mode: Literal["fold", "svd", "linear"] = Field("fold", description="fold: full weights; svd: one LoRA; linear: PEFT parity (cross terms).")
    svd_rank: int = Field(64, ge=1, description="Rank of the re-factorised LoRA in svd mode.")


class CalibrateConfig(Section):
    """Choose the persona strength after merge: sweep the merge scale, keep the strongest within tolerance."""

    enabled: bool = Field(True, description="Run the calibrate stage after merge (model/ becomes the chosen scale).")
    scales: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25],
                                description="Merge scales tried (x merge.weights); scale 0, the base model, is "
                                            "always measured as the reference.")
    max_looping_increase: float = Field(0.05, ge=0, le=1, description="Largest looping-rate increase over the base "
                                                                     "model a chosen scale may have.")
    max_capability_drop: float = Field(0.03, ge=0, le=1, description="Largest drop in MC accuracy (calibration "
                                                                    "items) below the base model a chosen scale may have.")
    prompts: int = Field(24, ge=1, description="Held-out prompts answered per scale (never the evaluation set).")
    kl_prompts: int = Field(8, ge=0, description="Of those, prompts for KL to the base (greedy answers).")
    max_new_tokens: int = Field(128, ge=1, description="Answer length per prompt.")
    mc_items: int | None = Field(None, ge=1, description="Calibration MC items scored per scale; None = all shipped.")
    seed: int = Field(0, description="Sampling seed of the answers (the same at every scale).")

    @model_validator(mode="after")
    def _positive_scales(self) -> "CalibrateConfig":
        if not self.scales or any(scale <= 0 for scale in self.scales):
            raise ValueError("calibrate.scales must be positive numbers -- fix: e.g. [0.25, 0.5, 0.75, 1.0]")
        return self


class EvalConfig(Section):
    """Evaluation sizes and settings. Conditions answer with generation.student's backend and sampling."""

    conditions: list[Literal["base", "prompted", "steered", "distilled", "trained"]] = Field(
        default_factory=lambda: ["base", "prompted", "steered", "distilled", "trained"],
        description="Built-in conditions to evaluate when the run has them (base is always measured: every change "
                    "is reported against it); --adapter and --model add more.")
    prompts: int = Field(200, ge=1, description="Held-out prompts per condition (shipped eval set, stratified by category).")
    robustness_prompts: int = Field(50, ge=0, description="Prompts answered under each of the 8 break-character "
                                                          "instructions and under the prefill attack.")
    identity_prompts: int = Field(35, ge=0, description="Identity probes ('who are you?') per condition.")
    harmful_prompts: int = Field(32, ge=0, description="Harmful requests per condition (safety in character).")
    elo_pairs: int = Field(300, ge=0, description="Revealed-preference trait pairs, per instruction and condition.")
    elo_k: float = Field(32.0, gt=0, description="Elo K factor. Published: 32.")
    elo_start: float = Field(1000.0, description="Starting Elo rating. Published: 1000.")
    elo_shuffles: int = Field(20, ge=1, description="Elo is averaged over this many shuffled match orders.")
    coherence_pairs: int = Field(100, ge=0, description="Prompts judged per pair of conditions (both orders).")
    capability_items: int | None = Field(None, ge=1, description="Generative short-answer items (arithmetic, knowledge), "
                                                                 "graded by lenient match; None = all shipped.")
    capability_max_new_tokens: int = Field(48, ge=1, description="Answer length for capability items (greedy).")
    mc_items: int | None = Field(None, ge=1, description="Held-out multiple-choice items (stratified by category), scored "
                                                         "by log-likelihood like lm-eval's acc/acc_norm; None = all "
                                                         "316 shipped.")
    mc_batch_size: int = Field(16, ge=1, description="Rows per forward pass when scoring multiple-choice items "
                                                     "(a row is one context with all its choices).")
    kl_prompts: int = Field(50, ge=0, description="Neutral prompts for KL(condition || base) on the condition's answers.")
    kl_chunk_size: int = Field(512, ge=1, description="Answer tokens per lm_head chunk in the KL computation.")
    classifier_lr: float = Field(5e-4, gt=0, description="Published: 5e-4.")
    classifier_epochs: float = Field(1.0, gt=0, description="Published: 1.")
    classifier_batch_size: int = Field(16, ge=1, description="Persona-classifier training and scoring batch.")
    classifier_max_length: int = Field(256, ge=8, description="Answer tokens the classifier reads (longer are truncated).")
    classifier_holdout: float = Field(0.2, gt=0, lt=1, description="Share of training prompts held out to score the "
                                                                   "classifier (split by prompt, never by answer).")
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for confidence intervals (Elo, BT, F1).")
    sample_answers: int = Field(6, ge=0, description="Prompts shown with every condition's answer side by side in the HTML.")
    base_model_names: list[str] = Field(default_factory=list, description="Names the base model calls itself, for the "
                                                                           "identity-leak probe; empty = from its model id.")
    seed: int = Field(0)


class Recipe(Section):
    """Everything a run needs besides the constitution."""

    preset: Literal["default", "smoke", "demo", "small", "paper"] = Field(
        "default", description="Named size preset applied under the other layers.")
    method: list[Literal["distill", "introspect", "sdft", "push_pull"]] = Field(
        default_factory=lambda: ["distill", "introspect"], description="Training stages in the chain.")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    introspect: IntrospectConfig = Field(default_factory=IntrospectConfig)
    sdft: SdftConfig = Field(default_factory=SdftConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    push_pull: PushPullConfig = Field(default_factory=PushPullConfig)
    steer: SteerConfig = Field(default_factory=SteerConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def push_pull_joins(self, stage: str) -> bool:
        """True when the push/pull regulariser is on (push_pull.enabled or method push_pull) for `stage`."""
        return (self.push_pull.enabled or "push_pull" in self.method) and self.push_pull.stage == stage

    @model_validator(mode="after")
    def _coherent(self) -> "Recipe":
        problems = []
        for name in ("distill", "introspect", "sdft"):
            cfg = getattr(self, name)
            if cfg.batch_size % cfg.micro_batch_size:
                problems.append(f"{name}.batch_size ({cfg.batch_size}) is not a multiple of {name}.micro_batch_size "
                                f"({cfg.micro_batch_size}) -- fix: make batch_size a multiple of micro_batch_size")
        for role in ("teacher", "student", "prompt_writer", "judge", "introspector"):
            backend = getattr(self.generation, role)
            if backend is not None and backend.backend in ("openai", "anthropic") \
                    and backend.sampling.repetition_penalty != 1.0:
                problems.append(f"generation.{role}.sampling.repetition_penalty: the {backend.backend} backend has no "
                                f"repetition penalty -- fix: set it to 1.0 (or use the hf or vllm backend)")
        if self.steer.layer_start >= self.steer.layer_end:
            problems.append("steer.layer_start must be below steer.layer_end -- fix: e.g. 0.125 and 0.875")
        if problems:
            raise ValueError("; ".join(problems))
        return self
