"""Benchmark LoRA DPO training: policy tokens/s, MFU and peak memory, optionally against TRL.

    PYTHONPATH=src python benchmarks/train.py --config llama3.1-8b --seq-len 1024 --pairs-per-step 4 \\
        --gradient-checkpointing --steps 8

The model has the real shapes of `--config` and random weights; the data are synthetic pairs
whose every sequence (prompt + response) is exactly `--seq-len` tokens (prompt = a quarter),
rendered by a word-level tokenizer with a ChatML-style template, so our trainer and TRL see the
same token ids. When `trl` is importable, TRL's DPOTrainer trains the same model shapes on the
same data with the same LoRA settings in the same process, and the ratios are printed.

TRL runs with the flags a performance-minded TRL user sets (`--trl-flags best`, the default):
`torch_compile=True`, `use_liger_kernel=True` when liger-kernel is installed, precomputed
reference log-probs (batch `--reference-batch-size`, as ours), and the same gradient-checkpointing
setting as ours; `--trl-flags default` leaves compile and liger off. Every row names its flags.
`--gradient-checkpointing both` runs the whole comparison with checkpointing on, then off.

`--offload-impl` picks who implements the offloads switched on with `--offload-optimizer` /
`--offload-activations` in our trainer: `ours` (stages/training/offload.py) or `library`
(`torch.autograd.graph.save_on_cpu(pin_memory=True)` for activations, torchao's
`CPUOffloadOptimizer` for the optimizer: CUDA only, needs torchao; it copies each gradient to the
CPU as backward produces it, before clipping, so `max_grad_norm` does not reach its update).
Run both on one GPU to decide whether ours stays (docs/performance.md lists the commands).

Conventions (each number in the table means exactly this):
- policy tokens/s: tokens of the pairs trained per second (chosen and rejected sequences, prompt
  and response, no padding: 2 x seq-len per pair unless --length-spread, however they are
  computed; for TRL the mean tokens per optimiser batch), median over the
  timed steps; the first `--warmup-steps` optimiser steps are not timed. The reference log-prob
  pass (once, before training, in both trainers) is reported separately, and for ours also as a
  multiple of a plain `model(input_ids)` forward over the same pairs in the same batches, timed
  in the same process just before training (`plain_forward_tokens_per_s`).
- computed tokens/s: token positions the policy actually runs per second. With prefix sharing
  (ours, default) a pair's prompt runs once, so this is below policy tokens/s.
- MFU: computed tokens/s x model FLOPs per token = 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B),
  with N = every matmul weight of the base model (output head included, input embedding lookup
  excluded); LoRA training is counted as the standard 6N, as published MFU figures are; L
  layers, H heads, Q head dim, T = sequence length. Divided by this machine's *measured* peak:
  the median rate of a large torch.matmul in the training dtype (bf16 on a GPU).
- peak memory: torch.cuda.max_memory_allocated while training (weights included; the
  reference pass before training excluded) minus what was allocated before that trainer's
  model was built (so nothing a previous trainer left behind counts), GiB. On a CPU: peak
  resident memory of the process. "left allocated" in the notes is what a trainer left on the
  GPU after its model was deleted (should be ~0).

Several processes (`--nproc N`, `--launcher torchrun|accelerate`): the script re-runs itself
under the launcher, one process per GPU (cuda:LOCAL_RANK), DDP, or FSDP2 through accelerate's
environment variables (ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ...). `--pairs-per-step` stays the
global batch (each process trains 1/N of it; `--micro-batch-size` is per process, default
pairs-per-step / N), so one and N processes are compared at the same global batch. The tokens/s
columns are then aggregate (all processes' tokens per step over rank 0's step time), MFU is over N
times the measured peak, peak memory is rank 0's, and TRL is not run. Rank 0 alone prints and appends.

The table is printed and appended (never rewritten) to `--results` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]


def model_config(name: str) -> Any:
    """A transformers config with the real shapes of a named model."""
    from transformers import LlamaConfig

    if name == "llama3.1-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                           max_position_embeddings=8192, tie_word_embeddings=False)
    if name == "smollm2-135m":
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                           max_position_embeddings=8192, tie_word_embeddings=True)
    if name == "tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192, tie_word_embeddings=False)
    raise SystemExit(f"unknown --config {name!r}: use llama3.1-8b, smollm2-135m or tiny")


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over the whole vocabulary ('w17' -> one id) with a ChatML-style template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def synthetic_records(count: int, seq_len: int, vocab_size: int, seed: int = 0, spread: float = 0.0) -> list[dict]:
    """Distill records whose rendered sequences are `seq_len` tokens (a quarter of them prompt).

    With `spread` > 0 each response is shortened by a uniform random share in [0, spread) of its
    length, chosen and rejected independently (real data: varied lengths, hence padding).
    """
    rng = random.Random(seed)
    prompt_words = seq_len // 4 - 5            # + <|im_start|> user ... <|im_end|> <|im_start|> assistant
    response_words = seq_len - 6 - prompt_words  # + <|im_end|>
    words = lambda n: " ".join(f"w{rng.randrange(vocab_size - len(SPECIALS))}" for _ in range(n))  # noqa: E731
    response = lambda: words(max(1, round(response_words * (1 - spread * rng.random()))))  # noqa: E731
    return [{"id": f"pair-{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": words(prompt_words)}],
             "chosen": response(), "rejected": response(), "provenance": {}}
            for i in range(count)]


def record_tokens(record: dict) -> int:
    """Tokens of a synthetic record's two rendered sequences (6 template tokens each, one per word)."""
    prompt = len(record["messages"][0]["content"].split())
    return sum(prompt + len(record[side].split()) + 6 for side in ("chosen", "rejected"))


def build_model(config: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """Random weights of the real shapes, created directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config._name_or_path = "random-weights"
    return model


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul rate (TFLOP/s): median of timed batches of square products, after warm-up."""
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for attempt in range(8):
        _sync(device)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        if attempt >= 2:
            rates.append(10 * 2 * size**3 / (time.perf_counter() - started) / 1e12)
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: Any, seq_len: int) -> float:
    """6 N + 12 L H Q T (PaLM appendix B); N = matmul weights incl. the output head, excl. the input embedding."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embedding
    if config.tie_word_embeddings:
        n += embedding  # the tied output head still does its matmul
    head_dim = config.hidden_size // config.num_attention_heads
    return 6 * n + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def profile_step(at_step: int, rows: int = 25) -> Callable[[dict], None]:
    """A training callback that profiles one optimiser step and prints the top kernels."""
    state: dict[str, Any] = {}

    def callback(record: dict) -> None:
        if record["step"] == at_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            state["profiler"] = torch.profiler.profile(activities=activities)
            state["profiler"].start()
        elif record["step"] == at_step + 1 and "profiler" in state:
            state["profiler"].stop()
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(state["profiler"].key_averages().table(sort_by=sort, row_limit=rows), flush=True)
    return callback


def run_ours(args: argparse.Namespace, model: Any, tokenizer: Any, records: list[dict]) -> dict[str, float]:
    """Train with character-baker's `train_dpo`; measure the timed steps."""
    from character_baker.core.config import DistillConfig
    from character_baker.core.runs import RunDir
    from character_baker.stages.training.dpo import train_dpo

    cfg = DistillConfig(batch_size=args.pairs_per_step, micro_batch_size=micro_batch_size(args),
                        max_length=args.seq_len, gradient_checkpointing=args.checkpointing, save_steps=10**6,
                        lora={"r": args.lora_r, "alpha": 2 * args.lora_r}, logprob_chunk_size=args.chunk_size,
                        torch_compile=args.compile, share_prompt=not args.no_share_prompt, pack_pairs=args.pack_pairs,
                        offload_optimizer=args.offload_optimizer, offload_activations=args.offload_activations,
                        offload_embeddings=args.offload_embeddings)
    plain_forward = plain_forward_tokens_per_s(model, tokenizer, records, reference_batch_size(args), args.seq_len)
    steps: list[dict] = []
    callbacks = [steps.append] + ([profile_step(args.warmup_steps + 1)] if args.profile else [])
    with tempfile.TemporaryDirectory() as scratch, offload_implementation(args.offload_impl):
        summary = train_dpo(RunDir.create(scratch), records, model, tokenizer, cfg, callbacks=callbacks)
    timed = steps[args.warmup_steps:]
    reference_tokens = sum(map(record_tokens, records)) * summary["prepare"]["reference_computed"] / len(records)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "computed_tokens_per_s": statistics.median(r["computed_tokens"] / r["step_seconds"] for r in timed),
            "step_seconds": statistics.median(r["step_seconds"] for r in timed),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in timed),
            "reference_tokens_per_s": reference_tokens / summary["prepare"]["reference_seconds"],
            "plain_forward_tokens_per_s": plain_forward, "final_loss": timed[-1]["loss"], "flags": our_flags(args, cfg)}


def plain_forward_tokens_per_s(model: Any, tokenizer: Any, records: list[dict], pairs_per_batch: int,
                               max_length: int) -> float:
    """Tokens/s of plain `model(input_ids)` forwards (inference mode, full logits) over the records' pairs.

    `pairs_per_batch` pairs per forward as padded rows [chosen..., rejected...]: what a reference
    pass's forwards cost with nothing of ours around them (no adapter, no prefix sharing).
    """
    from character_baker.stages.training.dpo import collate_pairs
    from character_baker.stages.training.tokenize import tokenize_preferences

    pairs, _ = tokenize_preferences(tokenizer, records, max_length)
    device, tokens = next(model.parameters()).device, 0
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pairs), pairs_per_batch):
            batch = collate_pairs(pairs[start:start + pairs_per_batch], tokenizer.pad_token_id or 0).to(device)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            tokens += batch.num_tokens
    _sync(device)
    return tokens / (time.perf_counter() - started)


def our_flags(args: argparse.Namespace, cfg: Any) -> str:
    """Our trainer's speed switches in this run, for the table."""
    flags = {key: getattr(cfg, key) for key in ("torch_compile", "gradient_checkpointing", "share_prompt", "pack_pairs",
                                                  "offload_optimizer", "offload_activations", "offload_embeddings")}
    if cfg.offload_optimizer or cfg.offload_activations:
        flags["offload_impl"] = args.offload_impl
    flags["reference_batch"] = reference_batch_size(args)
    return describe_flags(flags)


def run_trl(args: argparse.Namespace, model: Any, tokenizer: Any, records: list[dict]) -> dict[str, float]:
    """Train the same model shapes and data with TRL's DPOTrainer (same LoRA, beta, NLL weight)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from character_baker.backends.models import lora_target_modules

    device = next(model.parameters()).device

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.peak = [], 0.0

        def on_train_begin(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        def on_step_begin(self, *_, **__):
            _sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(device)
            self.seconds.append(time.perf_counter() - self.started)
            if device.type == "cuda":
                self.peak = max(self.peak, torch.cuda.max_memory_allocated(device) / 2**30)

    data = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    micro = micro_batch_size(args)
    timer, reference = StepTimer(), ReferenceTimer()
    flags = trl_flags(args)
    with tempfile.TemporaryDirectory() as scratch, reference.around(DPOTrainer), accelerate_environment_kept():
        config = DPOConfig(output_dir=scratch, per_device_train_batch_size=micro, max_steps=len(records) // args.pairs_per_step,
                           gradient_accumulation_steps=args.pairs_per_step // micro, learning_rate=5e-5, warmup_steps=0,
                           max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1],
                           max_length=args.seq_len, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                           gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no",
                           logging_steps=1, report_to=[], disable_tqdm=True, dataloader_drop_last=True, **flags)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=lora_target_modules(model, "all-linear"))
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora, callbacks=[timer])
        trainer.train()
    timed = timer.seconds[args.warmup_steps:]
    tokens_per_step = sum(map(record_tokens, records)) / len(records) * args.pairs_per_step  # mean over batches
    peak = timer.peak if device.type == "cuda" else _host_peak_gb()
    rate = statistics.median(tokens_per_step / s for s in timed)  # TRL computes every token of both rows (+ padding)
    return {"tokens_per_s": rate, "computed_tokens_per_s": rate,
            "step_seconds": statistics.median(timed), "peak_memory_gb": peak,
            "reference_tokens_per_s": sum(map(record_tokens, records)) / reference.seconds if reference.seconds else
            float("nan"), "final_loss": float("nan"), "flags": describe_flags(flags)}


class LibraryActivationOffload(torch.autograd.graph.save_on_cpu):
    """`--offload-impl library`: torch's save_on_cpu(pin_memory=True), called the way the trainer calls ours."""

    def __init__(self, min_bytes: int):
        super().__init__(pin_memory=True)  # torch offloads every saved tensor: no size threshold

    def release(self) -> None:
        """Nothing to free early: save_on_cpu's CPU copies go with the autograd graph."""


class TorchaoOffloadedAdamW:
    """`--offload-impl library`: torchao's CPUOffloadOptimizer behind the interface of our `OffloadedAdamW`.

    torchao copies each gradient to pinned CPU memory in a post-accumulate hook and steps a fused
    CPU AdamW per parameter; the GPU keeps float32 LoRA weights and gradients (ours keeps
    compute-dtype weights and frees each gradient). Its copy is taken before clipping, so the
    update is not clipped (`step` still returns the norm): measure speed and memory with it.
    """

    def __init__(self, named_params: Any, *, lr: float, weight_decay: float, compute_dtype: torch.dtype,
                 decoder: Any = None, layers: Any = ()):
        from torchao.optim import CPUOffloadOptimizer

        self.named = list(named_params)
        self.lead = CPUOffloadOptimizer([p for _, p in self.named], torch.optim.AdamW, lr=lr, weight_decay=weight_decay)

    def micro_step(self, last: bool) -> None:
        """Nothing to stage: torchao's backward hooks copy every gradient themselves."""

    def collect(self) -> None:
        """Nothing to collect between micro-batches (see `micro_step`)."""

    def step(self, max_grad_norm: float) -> float:
        """The gradient norm (clipping reaches only the GPU gradients, see the class), then torchao's CPU step."""
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], max_grad_norm)
        self.lead.step()
        self.lead.zero_grad()
        return float(norm)

    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights by name, torchao's optimizer state)."""
        return {name: p.detach().cpu().clone() for name, p in self.named}, self.lead.state_dict()

    def load_state_dicts(self, model: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
        """Restore what `state_dicts` wrote, into the GPU weights and torchao's CPU copies."""
        with torch.no_grad():
            for name, param in self.named:
                param.copy_(model[name])
                if param in self.lead.param_d2h_map:
                    self.lead.param_d2h_map[param].copy_(model[name])
        self.lead.load_state_dict(optimizer)

    def close(self) -> None:
        """No worker to stop."""


@contextlib.contextmanager
def offload_implementation(kind: str) -> Iterator[None]:
    """Run the block with our offloads ("ours") or the library ones swapped into the trainer ("library")."""
    if kind == "ours":
        yield
        return
    from unittest import mock

    from character_baker.stages.training import trainer

    with mock.patch.object(trainer, "ActivationOffload", LibraryActivationOffload), \
            mock.patch.object(trainer, "OffloadedAdamW", TorchaoOffloadedAdamW):
        yield


@contextlib.contextmanager
def accelerate_environment_kept() -> Iterator[None]:
    """Undo the ACCELERATE_* variables TRL's config sets, and accelerate's shared state, on leaving the block.

    `TrainingArguments(torch_compile=True)` exports ACCELERATE_DYNAMO_BACKEND into the process and
    accelerate keeps it in its singleton state, so every later `Accelerator()` (ours included)
    would compile its model.
    """
    from accelerate.state import AcceleratorState

    saved = {key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_")}
    try:
        yield
    finally:
        for key in [key for key in os.environ if key.startswith("ACCELERATE_")]:
            del os.environ[key]
        os.environ.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)


def trl_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The DPOConfig switches that shape TRL's speed in this run (TRL 1.16 names)."""
    import importlib.util

    best = args.trl_flags == "best"
    flags: dict[str, Any] = dict(precompute_ref_log_probs=True, precompute_ref_batch_size=reference_batch_size(args),
                                 gradient_checkpointing=args.checkpointing, torch_compile=best)
    if best and importlib.util.find_spec("liger_kernel") is not None:
        flags["use_liger_kernel"] = True
    return flags


class ReferenceTimer:
    """Times TRL's reference log-prob pass (`DPOTrainer._precompute_ref_logps`, run by its constructor)."""

    def __init__(self):
        self.seconds = 0.0

    def around(self, trainer_class: Any) -> Any:
        """Patch the class's precompute method with a timed call of itself for the block."""
        from unittest import mock

        original = trainer_class._precompute_ref_logps

        def timed(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return mock.patch.object(trainer_class, "_precompute_ref_logps", timed)


def describe_flags(flags: dict[str, Any]) -> str:
    """`name=value` for each switch, for the table."""
    return ", ".join(f"{key}={value}" for key, value in flags.items())


def reference_batch_size(args: argparse.Namespace) -> int:
    """Pairs per forward of the reference pass: our trainer's choice, given to TRL as well."""
    from character_baker.stages.training.dpo import reference_pairs_per_batch

    return reference_pairs_per_batch(micro_batch_size(args))


def micro_batch_size(args: argparse.Namespace) -> int:
    """Pairs per forward in each process: `--micro-batch-size`, else this process's share of the global batch."""
    return args.micro_batch_size or args.pairs_per_step // world_size()


def _host_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _allocated_gb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def world_size() -> int:
    """Processes training together (1 unless started by a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (the one that prints and appends), or the only process."""
    return os.environ.get("RANK", "0") == "0"


def processes_note() -> str:
    """`, 2 processes (DDP)` for a multi-process run, else nothing (after training: accelerate's state is set)."""
    if world_size() == 1:
        return ""
    from accelerate.state import AcceleratorState

    from character_baker.stages.training.trainer import distribution_name

    return f", {world_size()} processes ({distribution_name(AcceleratorState())}, same global batch)"


def machine_description(device: torch.device) -> str:
    """GPU name (or CPU model) and core count; `N x` the GPU when N processes use one GPU each."""
    if device.type == "cuda":
        count = f"{world_size()} x " if world_size() > 1 else ""
        return (f"{count}{torch.cuda.get_device_name(device)} "
                f"({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    processes = f", {world_size()} processes" if world_size() > 1 else ""
    return f"CPU {cpu}, {torch.get_num_threads()} threads{processes}"


def versions() -> str:
    """Versions of the libraries that shape the numbers."""
    import importlib.metadata as metadata

    found = []
    for name in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def markdown(args: argparse.Namespace, device: torch.device, peak_tflops: float, per_token: float,
             results: dict[str, dict[str, float]]) -> str:
    """The results as a markdown section (appended to RESULTS.md)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## LoRA DPO training: {args.config}, {args.pairs_per_step} pairs x {args.seq_len} tokens per step, "
             f"LoRA r{args.lora_r}, gradient checkpointing {'on' if args.checkpointing else 'off'}"
             f"{', ' + ', '.join(our_options(args)) if our_options(args) else ''}{processes_note()}\n",
             f"- machine: {machine_description(device)}; measured matmul peak {peak_tflops:.3g} TFLOP/s "
             f"({'bf16' if device.type == 'cuda' else 'float32'})",
             f"- date: {when}; versions: {versions()}",
             f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`"
             f"{f' in {world_size()} processes (--nproc {world_size()})' if world_size() > 1 else ''}",
             f"- model FLOPs/token (6N + 12LHQT): {per_token / 1e9:.3g} GFLOP; timed steps: {args.steps} "
             f"{'' if world_size() == 1 else f'(tokens/s: all processes; MFU over {world_size()} x the peak; memory: rank 0) '}"
             f"after {args.warmup_steps} warm-up"
             + (f"; responses shortened by up to {args.length_spread:.0%}" if args.length_spread else "")
             + (f"\n- note: {args.note}" if args.note else "") + "\n",
             "| trainer | policy tokens/s | computed tokens/s | MFU | step (s) | peak memory (GiB) | reference pass tokens/s | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        mfu = row["computed_tokens_per_s"] * per_token / (peak_tflops * world_size() * 1e12)
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {row['computed_tokens_per_s']:,.0f} | {mfu:.1%} | "
                     f"{row['step_seconds']:.3f} | {row['peak_memory_gb']:.2f} | {_rate(row['reference_tokens_per_s'])} | "
                     f"{row['flags']} |")
    ours = results["character-baker"]
    lines.append(f"\nour reference pass runs at x{ours['reference_tokens_per_s'] / ours['tokens_per_s']:.2f} our training "
                 f"tokens/s and x{ours['reference_tokens_per_s'] / ours['plain_forward_tokens_per_s']:.2f} a plain "
                 f"`model(input_ids)` forward of the same batches ({ours['plain_forward_tokens_per_s']:,.0f} tokens/s, "
                 f"same process, before training)")
    if len(results) == 2:
        theirs = results[next(name for name in results if name != "character-baker")]
        lines.append(f"\ncharacter-baker vs TRL: tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                     f"peak memory x{ours['peak_memory_gb'] / theirs['peak_memory_gb']:.2f}")
    return "\n".join(lines) + "\n"


def our_options(args: argparse.Namespace) -> list[str]:
    """Our trainer's non-default switches in this run, for the section title."""
    names = {"compile": "torch.compile", "no_share_prompt": "no prefix sharing", "pack_pairs": "packed pairs",
             "offload_optimizer": "optimizer offload",
             "offload_activations": "activation offload", "offload_embeddings": "embedding offload"}
    library = {"offload_optimizer", "offload_activations"} if args.offload_impl == "library" else set()
    return [f"{label} ({'library' if key in library else 'ours'})" for key, label in names.items() if getattr(args, key)]


def _rate(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}"  # NaN: not measured


def print_table(args: argparse.Namespace, peak_tflops: float, per_token: float, results: dict) -> None:
    """A rich table of the results."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoRA DPO {args.config}: {args.pairs_per_step} x {args.seq_len}-token pairs per step"
                        f"{processes_note()}")
    table.add_column("trainer", no_wrap=True)
    for column in ("policy tokens/s", "computed tokens/s", "MFU", "step (s)", "peak GiB", "reference tokens/s"):
        table.add_column(column, justify="right")
    table.add_column("flags")
    for name, row in results.items():
        mfu = row["computed_tokens_per_s"] * per_token / (peak_tflops * world_size() * 1e12)
        table.add_row(name, f"{row['tokens_per_s']:,.0f}", f"{row['computed_tokens_per_s']:,.0f}", f"{mfu:.1%}",
                      f"{row['step_seconds']:.3f}", f"{row['peak_memory_gb']:.2f}", _rate(row["reference_tokens_per_s"]),
                      row["flags"])
    Console().print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="llama3.1-8b, smollm2-135m or tiny")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (prompt + response)")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="preference pairs per optimiser step")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="pairs per forward in each process (default: pairs-per-step / processes)")
    parser.add_argument("--gradient-checkpointing", nargs="?", const="on", default="off", choices=("on", "off", "both"),
                        help="on (the bare flag), off, or both: the whole comparison with it on, then off")
    parser.add_argument("--trl-flags", default="best", choices=("best", "default"),
                        help="best: torch_compile, liger kernels when installed; default: neither (both precompute "
                             "the reference and follow --gradient-checkpointing)")
    parser.add_argument("--offload-impl", default="ours", choices=("ours", "library"),
                        help="who implements --offload-optimizer/--offload-activations: ours, or torchao's "
                             "CPUOffloadOptimizer and torch's save_on_cpu(pin_memory=True)")
    parser.add_argument("--compile", action="store_true", help="torch_compile=True (our trainer only)")
    parser.add_argument("--no-share-prompt", action="store_true", help="share_prompt=False: two rows per pair (ours)")
    parser.add_argument("--pack-pairs", action="store_true", help="pack_pairs=True: several pairs per row (ours)")
    parser.add_argument("--length-spread", type=float, default=0.0,
                        help="shorten each response by a random share in [0, this) (0: every sequence is --seq-len)")
    parser.add_argument("--offload-optimizer", action="store_true", help="offload_optimizer=True (ours)")
    parser.add_argument("--offload-activations", action="store_true", help="offload_activations=True (ours)")
    parser.add_argument("--offload-embeddings", action="store_true", help="offload_embeddings=True (ours)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed optimiser steps first")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--chunk-size", type=int, default=512, help="logprob_chunk_size")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="a remark added to the results section")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when installed")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one of our steps")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one per GPU) training one global batch of --pairs-per-step; ours only")
    parser.add_argument("--launcher", default="torchrun", choices=("torchrun", "accelerate"),
                        help="what starts the --nproc processes (accelerate: FSDP2 through its environment variables)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="markdown file to append to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, append it to the results file."""
    import importlib.util

    from character_baker.stages.training.launch import relaunch

    args = parse_args(argv)
    if args.pairs_per_step % args.nproc:
        raise SystemExit(f"--pairs-per-step {args.pairs_per_step} must be a multiple of --nproc {args.nproc}")
    launched = relaunch(sys.argv[1:] if argv is None else argv, launcher=args.launcher if args.nproc > 1 else None,
                        nproc=args.nproc, program=[sys.argv[0] if argv is None else str(Path(__file__))])
    if launched is not None:  # the launched processes did the work
        return launched
    if args.threads:
        torch.set_num_threads(args.threads)
    device = process_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_tflops = matmul_tflops(device, dtype)
    config = model_config(args.config)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    records = synthetic_records(args.pairs_per_step * (args.steps + args.warmup_steps), args.seq_len, config.vocab_size,
                                spread=args.length_spread)
    if args.offload_impl == "library" and args.offload_optimizer and (
            device.type != "cuda" or importlib.util.find_spec("torchao") is None):
        raise SystemExit("--offload-impl library --offload-optimizer runs torchao's CPUOffloadOptimizer: "
                         "it needs a CUDA GPU and `pip install torchao`")
    trainers = [("character-baker", run_ours)]
    if not args.no_trl and world_size() == 1 and importlib.util.find_spec("trl") is not None:
        import trl

        trainers.append((f"TRL {trl.__version__} DPOTrainer", run_trl))
    for checkpointing in (True, False) if args.gradient_checkpointing == "both" else (args.gradient_checkpointing == "on",):
        args.checkpointing = checkpointing
        compare(args, device, dtype, peak_tflops, config, tokenizer, records, trainers)
    return 0


def process_device(requested: str) -> torch.device:
    """The device this process trains on: `--device`, with each launched process on its own GPU."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if kind == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def compare(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak_tflops: float, config: Any,
            tokenizer: Any, records: list[dict], trainers: list[tuple[str, Callable]]) -> None:
    """Run every trainer on a fresh model of the same shapes; print and append one results section."""
    results, leftovers = {}, []
    per_token = 0.0
    for name, run in trainers:
        before = _allocated_gb(device)
        model = build_model(config, device, dtype)
        per_token = flops_per_token(model, args.seq_len)
        results[name] = run(args, model, tokenizer, records)
        if device.type == "cuda":
            results[name]["peak_memory_gb"] -= before
        del model
        _free(device)
        leftovers.append(f"{name} {_allocated_gb(device) - before:.2f} GiB")
    if device.type == "cuda":
        args.note = "; ".join(filter(None, [args.note, "left allocated after each trainer: " + ", ".join(leftovers)]))
    if not is_main_process():
        return
    print_table(args, peak_tflops, per_token, results)
    section = markdown(args, device, peak_tflops, per_token, results)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
