"""The LoRA training loop every training stage shares: config -> setup -> train -> cleanup.

    trainer = LoraTrainer(cfg, objective, run_dir, stage="distill")
    trainer.setup(model, examples, pad_token_id)
    summary = trainer.train()
    trainer.cleanup()

What a stage supplies is an `Objective` (what the loss is, e.g. DPO or SFT) and, optionally,
`ExtraLoss` terms (e.g. the push/pull activation regulariser); the loop, data order,
distribution, checkpoints and logs are the same for all of them.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from character_baker.core.config import TrainingConfig
from character_baker.core.errors import Problem, UserError
from character_baker.core.runs import RunDir, is_adapter_folder, stable_hash
from character_baker.stages.training import checkpoints, offload
from character_baker.stages.training.batching import Batch, epoch_batches, micro_batches, steps_per_epoch
from character_baker.stages.training.fused_lora import fuse_lora_layers
from character_baker.stages.training.losses import ResponseScorer
from character_baker.stages.training.monitor import BEST_FOLDER, TrainingMonitor
from character_baker.stages.training.offload import ActivationOffload, OffloadedAdamW, offload_input_embeddings
from character_baker.stages.training.reporting import StepReporter, peak_memory_gb, report_to_problems


class Objective(Protocol):
    """What a training stage optimises. Losses are contributions to the global-batch mean.

    - `counts(example)`: the example's share of each normaliser, e.g. {"pairs": 1, "chosen_tokens": 37}.
    - `prepare(model, dataset, run_dir)`: once, before training (e.g. cache reference log-probs);
      returns a summary dict. `model` is the prepared `ResponseScorer`.
    - `collate(examples, pad_token_id)`: a `Batch` (with `counts` filled in).
    - `loss(model, batch)`: (loss, metrics). Divide sums by `batch.totals[...]` (the counts summed
      over the whole optimiser batch on all processes), so micro-batches and processes add up
      to the exact global mean; metrics follow the same rule (e.g. accuracy = correct / pairs).
    """

    name: str

    def counts(self, example: Any) -> dict[str, float]: ...

    def prepare(self, model: nn.Module, dataset: Sequence[Any], run_dir: RunDir) -> dict[str, Any]: ...

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class ExtraLoss(Protocol):
    """A term added to the objective's loss (e.g. an activation regulariser), with its own metric name.

    `attach(peft_model)` runs once after setup (e.g. to register forward hooks that capture
    activations with their graph); `loss(batch)` runs after each objective loss on the same
    forward and returns (weighted term, extra metrics), following the `Objective.loss` rule.
    The term is logged as `<name>_loss`.
    """

    name: str

    def attach(self, model: nn.Module) -> None: ...

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def sum_counts(counts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise sum of count dicts."""
    total: dict[str, float] = defaultdict(float)
    for entry in counts:
        for key, value in entry.items():
            total[key] += value
    return dict(total)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Learning-rate multiplier of optimiser step `step` (0-based): linear warm-up, then linear/cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def config_problems(cfg: TrainingConfig, section: str, num_examples: int, world_size: int) -> list[Problem]:
    """Every impossible setting of a training section, each with its fix."""
    problems = report_to_problems(cfg.report_to, f"{section}.report_to")
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        problems.append(Problem("recipe", f"{section}.batch_size",
                                f"{cfg.batch_size} is not a multiple of micro_batch_size ({cfg.micro_batch_size}) "
                                f"x processes ({world_size}) = {per_step}",
                                f"set batch_size to a multiple of {per_step}, or change micro_batch_size/--nproc"))
    for flag in ("offload_optimizer", "offload_activations"):
        if getattr(cfg, flag) and world_size > 1:
            problems.append(Problem("recipe", f"{section}.{flag}", f"runs in one process, not {world_size}",
                                    f"set {section}.{flag}: false for multi-GPU runs (FSDP shards the state instead)"))
    if cfg.offload_activations and not cfg.gradient_checkpointing:
        problems.append(Problem("recipe", f"{section}.offload_activations", "needs gradient_checkpointing (it offloads "
                                "the inputs each checkpointed layer keeps)", f"set {section}.gradient_checkpointing: true"))
    if int(steps_per_epoch(num_examples, cfg.batch_size) * cfg.epochs) < 1 and \
            fit_batch_to_data(cfg, num_examples, world_size)[1] is None:
        problems.append(Problem("recipe", f"{section}.batch_size",
                                f"{num_examples} usable examples make no full batch of {cfg.batch_size} "
                                f"over {cfg.epochs} epoch(s)", f"lower {section}.batch_size, provide more data, or set "
                                f"{section}.shrink_batch_to_data: true"))
    return problems


def fit_batch_to_data(cfg: TrainingConfig, num_examples: int, world_size: int) -> tuple[TrainingConfig, str | None]:
    """`cfg` with batch_size (and micro_batch_size) lowered so that `num_examples` fill at least one step.

    Returns (settings to train with, a note saying what changed, or None). Nothing changes when the
    data already fill a step, when `shrink_batch_to_data` is off (the caller then reports the
    shortage as an error) or when there are fewer examples than processes.
    """
    if int(steps_per_epoch(num_examples, cfg.batch_size) * cfg.epochs) >= 1 or not cfg.shrink_batch_to_data:
        return cfg, None
    micro = min(cfg.micro_batch_size, num_examples // world_size)
    if micro < 1:
        return cfg, None
    per_step = micro * world_size
    batch = per_step * max(1, int(min(num_examples, num_examples * cfg.epochs)) // per_step)
    note = (f"only {num_examples} usable examples for a batch of {cfg.batch_size}: training with batch_size {batch} "
            f"(micro_batch_size {micro}) instead")
    return cfg.model_copy(update={"batch_size": batch, "micro_batch_size": micro}), note


def training_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The summary keys every training stage reports: steps, resume point, time, a shrunken batch."""
    summary = {"steps": result["steps"], "resumed_from_step": result["resumed_from_step"],
               "train_seconds": round(result["train_seconds"], 1)}
    for key in ("batch_note", "stopped_early_at", "adapter_step", "monitor_base_looping", "monitor_best_step",
                "monitor_best_persona", "monitor_best_looping"):
        if result.get(key) is not None:
            summary[key] = result[key]
    return summary


def _train_on_cpu(model: nn.Module, world_size: int) -> bool:
    """True to train on the CPU: the model lives there and this is one process, or there is no GPU."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return not torch.cuda.is_available() or (on_cpu and world_size == 1)


def fsdp_requested() -> bool:
    """True when accelerate's environment asks for FSDP (ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def distribution_name(accelerator: Any) -> str:
    """How the processes share the model: 'FSDP2', 'FSDP', 'DDP', or 'one process'."""
    if accelerator.num_processes == 1:
        return "one process"
    if accelerator.distributed_type == "FSDP":
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP"
    return "DDP"


def _mixed_precision(model: nn.Module) -> str:
    """Autocast for half-precision weights (LoRA weights and optimizer state stay float32).

    Under FSDP (`accelerate launch` with ACCELERATE_USE_FSDP) there is no autocast: FSDP's mixed
    precision would cast the float32 LoRA weights to bf16 and hand back bf16 gradients for float32
    shards; PEFT already casts each layer's input to its LoRA weights' dtype and back.
    """
    if fsdp_requested():
        return "no"
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


class LoraTrainer:
    """LoRA training on a frozen base model with a pluggable objective.

    Features, the flag that controls each, and its cost:

    - LoRA adapters (`lora.r`, `lora.alpha`, `lora.dropout`, `lora.target_modules`): only
      r x (in + out) weights per adapted projection train; the base stays frozen (and is the
      reference/teacher with the adapter disabled: no second copy of the model).
    - Effective batch `batch_size` = `micro_batch_size` x accumulation x processes (checked up
      front). Losses are exact global-batch means, independent of the split.
    - Data order: length-bucketed batches (padding is not compute), a pure function of `seed`
      and the epoch, identical for any number of processes (see `batching`).
    - Distribution: accelerate (CPU, one GPU, DDP; FSDP through `accelerate launch` config).
    - Mixed precision: bf16/fp16 autocast when the weights are bf16/fp16; LoRA weights and
      AdamW state stay float32.
    - Fused LoRA layers (always, when dropout is 0): the scale and the add ride in the GEMMs
      (see `fused_lora`); same math as PEFT, about a tenth fewer memory passes.
    - `torch_compile`: each decoder layer compiled (fused element-wise ops); compile time first.
    - `gradient_checkpointing`: recompute each layer in backward: far less activation memory,
      about a third more compute.
    - `logprob_chunk_size`: lm_head on trained tokens only, in chunks (no [batch, seq, vocab]).
    - `offload_optimizer`, `offload_activations`, `offload_embeddings`: optimizer state (ZeRO-Offload,
      stepped by a CPU thread ahead of the next forward), checkpointed activations and the frozen
      input embedding in CPU memory; same math, less GPU memory (see `offload`).
    - AdamW (fused on GPU) on the LoRA weights; `learning_rate`, `weight_decay`, linear warm-up
      over `warmup_ratio` of the steps then `lr_scheduler` decay to zero; `max_grad_norm` clipping.
    - `epochs` (may be fractional); an incomplete last batch of an epoch is skipped.
    - Checkpoints every `save_steps` and at the end in adapters/<stage>/checkpoint-N (atomic;
      `save_total_limit` kept); a rerun resumes from the newest complete one with the same data
      order and step count. The final adapter is a standard PEFT folder in adapters/<stage>/.
    - Logging: logs/<stage>.jsonl every step, a progress bar, `report_to` trackers.
    """

    def __init__(self, cfg: TrainingConfig, objective: Objective, run_dir: RunDir, *, stage: str,
                 extra_losses: Sequence[ExtraLoss] = (), callbacks: Sequence[Callable[[dict], None]] = (),
                 console: Any = None, base_model: str | None = None, monitor: TrainingMonitor | None = None):
        self.cfg, self.objective, self.run_dir, self.stage = cfg, objective, run_dir, stage
        self.extra_losses, self.callbacks, self.console, self.base_model = list(extra_losses), list(callbacks), console, base_model
        self.stage_dir = run_dir.path("adapters", stage)
        self.monitor = monitor

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, examples: Sequence[Any], pad_token_id: int) -> None:
        """Validate, build the accelerator, adapter, optimizer and schedule, prepare the objective, resume."""
        self.examples, self.pad_token_id = list(examples), pad_token_id
        self._batches: dict[int, list[list[int]]] = {}
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        problems = config_problems(self.cfg, self.stage, len(self.examples), world_size)
        if problems:
            raise UserError(problems)
        self.cfg, self.batch_note = fit_batch_to_data(self.cfg, len(self.examples), world_size)
        self.accelerator = self._setup_accelerator(model, world_size)
        self.peft_model = self._setup_adapter(model)
        scorer = ResponseScorer(self.peft_model, self.cfg.logprob_chunk_size)
        self.offloaded: OffloadedAdamW | None = None
        if self.cfg.offload_optimizer:
            dtype = next(p for n, p in scorer.named_parameters() if not p.requires_grad).dtype
            decoder = self.peft_model.get_base_model().get_decoder()
            self.offloaded = OffloadedAdamW([(n, p) for n, p in scorer.named_parameters() if p.requires_grad],
                                            lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay,
                                            compute_dtype=dtype, decoder=decoder, layers=getattr(decoder, "layers", ()))
            self.optimizer, self.scheduler = self._schedule(self.offloaded.lead)
            self.scorer = self.accelerator.prepare(scorer)
        else:
            self.optimizer, self.scheduler = self._setup_optimizer(self.peft_model)
            self.scorer, self.optimizer = self.accelerator.prepare(scorer, self.optimizer)
        self.activation_offload = ActivationOffload(offload.MIN_OFFLOAD_BYTES) if self.cfg.offload_activations else None
        self.scorer.train()
        self.start_step = self._resume()
        self.reporter = self._setup_reporter(start_step=self.start_step)
        if self.batch_note:
            self.reporter.message(f"warning: {self.stage}: {self.batch_note}")
        self.reporter.message(f"{self.stage}: {len(self.examples)} examples, {self.total_steps} steps "
                              f"({self.start_step} done), {self.accumulation} accumulation step(s) x {world_size} "
                              f"process(es) ({distribution_name(self.accelerator)}) on {self.accelerator.device}{self.embedding_note}")
        if fsdp_requested() and distribution_name(self.accelerator) == "DDP":  # accelerate shards on GPUs only
            self.reporter.message(f"warning: {self.stage}: ACCELERATE_USE_FSDP is set, but accelerate applies FSDP on "
                                  f"GPUs only: these {world_size} CPU processes train with DDP")
        self.prepared = self.objective.prepare(self.scorer, self.examples, self.run_dir)
        for extra in self.extra_losses:
            extra.attach(self.peft_model)
        self._setup_monitor(world_size)

    def _setup_monitor(self, world_size: int) -> None:
        """Restore the monitor's history up to the resumed step and measure the base model once."""
        if self.monitor is None:
            return
        if world_size > 1:
            self.reporter.message(f"{self.stage}: monitor off (it answers in one process; this run has {world_size})")
            self.monitor = None
            return
        self.monitor.resume(self.start_step, self.fingerprint)
        self.monitor.measure_base(self.peft_model, self.monitor.base_reference)
        self.reporter.message(f"{self.stage}: monitor every {self.monitor.cfg.every} steps on "
                              f"{len(self.monitor.prompts)} held-out prompts; base looping {self.monitor.base_looping}")

    def _setup_accelerator(self, model: nn.Module, world_size: int) -> Any:
        from accelerate import Accelerator

        self.accumulation = self.cfg.batch_size // (self.cfg.micro_batch_size * world_size)
        self.steps_per_epoch = steps_per_epoch(len(self.examples), self.cfg.batch_size)
        self.total_steps = int(self.steps_per_epoch * self.cfg.epochs)
        return Accelerator(gradient_accumulation_steps=self.accumulation, mixed_precision=_mixed_precision(model),
                           cpu=_train_on_cpu(model, world_size))

    def _setup_adapter(self, model: nn.Module) -> nn.Module:
        from character_baker.backends.models import attach_lora

        peft_model = attach_lora(model, self.cfg.lora, seed=self.cfg.seed)
        if self.base_model:
            peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = self.base_model
        self.embedding_note = ""
        if self.cfg.offload_embeddings:  # before checkpointing, which hooks the embedding's output
            freed = offload_input_embeddings(peft_model.get_base_model())
            self.embedding_note = (", offload_embeddings: the input embedding is tied to the output head and stays"
                                   if freed is None else f", input embedding in CPU memory ({freed / 2**30:.2f} GiB freed)")
        if self.cfg.gradient_checkpointing:
            # The reentrant form saves each layer's input through autograd, where the offload hooks see it.
            reentrant = self.cfg.offload_activations
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        peft_model.config.use_cache = False
        fuse_lora_layers(peft_model)
        if self.cfg.torch_compile:
            for layer in peft_model.get_base_model().get_decoder().layers:
                layer.compile()
        return peft_model

    def _setup_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay, fused=fused)
        return self._schedule(optimizer)

    def _schedule(self, optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, Any]:
        warmup = math.ceil(self.cfg.warmup_ratio * self.total_steps)
        schedule = lambda step: lr_factor(step, self.total_steps, warmup, self.cfg.lr_scheduler)  # noqa: E731
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def _setup_reporter(self, start_step: int) -> StepReporter:
        return StepReporter(self.run_dir.path("logs", f"{self.stage}.jsonl"), total_steps=self.total_steps,
                            start_step=start_step, console=self.console, report_to=self.cfg.report_to,
                            run_name=f"{self.run_dir.name}-{self.stage}", config=self.cfg.model_dump(),
                            enabled=self.accelerator.is_main_process)

    @property
    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the data, the objective and the settings that shape the run."""
        settings = self.cfg.model_dump(exclude={"save_steps", "save_total_limit", "report_to", "micro_batch_size",
                                                "gradient_checkpointing", "logprob_chunk_size", "torch_compile",
                                                "share_prompt", "pack_pairs", "offload_activations",
                                                "offload_embeddings", "monitor"})
        extras = [getattr(extra, "fingerprint", extra.name) for extra in self.extra_losses]
        return stable_hash([self.stage, self.objective.name, settings, [getattr(e, "id", "") for e in self.examples],
                            [len(e) for e in self.examples], extras])

    def _resume(self) -> int:
        found = checkpoints.complete_checkpoints(self.stage_dir, self.fingerprint)
        if not found:
            return 0
        return checkpoints.load_checkpoint(found[-1][1], scorer=self.scorer, optimizer=self._inner_optimizer,
                                           scheduler=self.scheduler, rank=self.accelerator.process_index,
                                           world_size=self.accelerator.num_processes,
                                           device=self.accelerator.device, offloaded=self.offloaded)

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer itself (accelerate wraps it unless the optimizer is offloaded)."""
        return self.optimizer if self.offloaded else self.optimizer.optimizer

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, Any]:
        """Run the remaining optimiser steps, checkpointing and logging; publish the final adapter."""
        record: dict[str, Any] = {}
        self.tokens_trained, self.started = 0, time.perf_counter()
        if self.accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        stopped_at = self.start_step if self.monitor and self.monitor.should_stop() else None
        for step in range(self.start_step, self.total_steps if stopped_at is None else self.start_step):
            record = self._train_step(step)
            self._monitor_step(record)
            self.reporter.log(record)
            for callback in self.callbacks:
                callback(record)
            if record["step"] % self.cfg.save_steps == 0 or record["step"] == self.total_steps:
                self._save_checkpoint(record["step"])
            if self.monitor and self.monitor.should_stop():
                stopped_at = record["step"]
                self.reporter.message(f"{self.stage}: stopping early at step {stopped_at}: the last "
                                      f"{self.monitor.cfg.patience} checks did not beat step "
                                      f"{getattr(self.monitor.best(), 'step', None)}")
                if record["step"] % self.cfg.save_steps:
                    self._save_checkpoint(record["step"])
                break
        kept = self._publish_adapter()
        return {"stage": self.stage, "steps": self.total_steps, "resumed_from_step": self.start_step,
                "examples": len(self.examples), "tokens_trained": self.tokens_trained, "final_metrics": record,
                "adapter_path": str(self.stage_dir), "prepare": self.prepared, "batch_note": self.batch_note,
                "train_seconds": time.perf_counter() - self.started, "stopped_early_at": stopped_at,
                "adapter_step": kept, **(self.monitor.summary() if self.monitor else {})}

    def _monitor_step(self, record: dict[str, Any]) -> None:
        """A monitor check when one is due: its numbers join the step's record; a new best is saved."""
        if self.monitor is None or not self.monitor.due(record["step"], self.total_steps):
            return
        check = self.monitor.check(self.peft_model, record["step"])
        record.update(monitor_persona=check.persona, monitor_looping=check.looping, monitor_eligible=check.eligible)
        if self.monitor.best() is check:
            model_state, _ = self._trainable_state()
            checkpoints.publish_adapter(self.monitor.stage_dir / BEST_FOLDER, self.peft_model, model_state)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            lengths = [len(example) for example in self.examples]
            self._batches = {epoch: epoch_batches(lengths, self.cfg.batch_size, self.cfg.seed, epoch)}
        return self._batches[epoch]

    def _train_step(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        epoch, index = divmod(step, self.steps_per_epoch)
        global_batch = self._epoch_batches(epoch)[index]
        totals = sum_counts([self.objective.counts(self.examples[i]) for i in global_batch])
        learning_rate = self.scheduler.get_last_lr()[0]
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.accelerator.device))
        micros = micro_batches(global_batch, self.cfg.micro_batch_size, self.accelerator.process_index,
                               self.accelerator.num_processes)
        for number, micro in enumerate(micros):
            batch = self.objective.collate([self.examples[i] for i in micro], self.pad_token_id)
            batch.totals = totals
            last = number == len(micros) - 1
            if self.offloaded:
                self.offloaded.micro_step(last)
            for key, value in self._micro_step(batch.to(self.accelerator.device)).items():
                sums[key] += value
            if self.offloaded and not last:
                self.offloaded.collect()
        if self.offloaded:
            grad_norm = self.offloaded.step(self.cfg.max_grad_norm)
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.scorer.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = self._reduce(sums)
        return self._record(step, metrics, learning_rate, float(grad_norm), time.perf_counter() - started)

    def _micro_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.accelerator.accumulate(self.scorer):
            with self.activation_offload or nullcontext():
                loss, metrics = self.objective.loss(self.scorer, batch)
            for extra in self.extra_losses:
                term, extra_metrics = extra.loss(batch)
                loss = loss + term
                metrics = {**metrics, **extra_metrics, f"{extra.name}_loss": term}
            # accelerate divides by the accumulation steps and DDP averages over processes; the
            # terms are already global-batch means, so undo both.
            self.accelerator.backward(loss * self.accumulation * self.accelerator.num_processes)
            if self.activation_offload:
                self.activation_offload.release()
        metrics = {key: value.detach().float() for key, value in metrics.items()}
        metrics["loss"] = loss.detach().float()
        metrics["tokens"] = torch.tensor(float(batch.num_tokens), device=self.accelerator.device)
        metrics["computed_tokens"] = torch.tensor(float(batch.computed_tokens), device=self.accelerator.device)
        return metrics

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.stack([sums[key] for key in keys])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return dict(zip(keys, values.tolist()))

    def _record(self, step: int, metrics: dict[str, float], learning_rate: float, grad_norm: float,
                seconds: float) -> dict[str, Any]:
        done = step + 1
        elapsed = time.perf_counter() - self.started
        tokens = int(metrics.pop("tokens"))
        self.tokens_trained += tokens
        eta = elapsed / (done - self.start_step) * (self.total_steps - done)
        return {"step": done, "epoch": done / self.steps_per_epoch, **metrics, "learning_rate": learning_rate,
                "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "peak_memory_gb": peak_memory_gb(self.accelerator.device), "step_seconds": seconds,
                "elapsed_s": elapsed, "eta_s": eta}

    # ------------------------------------------------------------------ saving
    def _trainable_state(self) -> tuple[dict, dict]:
        if self.offloaded:  # the float32 masters and the CPU optimizer, in the same layout
            return self.offloaded.state_dicts()
        return checkpoints.trainable_state(self.scorer, self.optimizer.optimizer)

    def _gathered_state(self) -> tuple[dict, dict, list]:
        from accelerate.utils import gather_object

        model_state, optimizer_state = self._trainable_state()
        mine = [checkpoints.rng_state(self.accelerator.device)]
        rng_states = gather_object(mine) if self.accelerator.num_processes > 1 else mine  # one per rank, in rank order
        return model_state, optimizer_state, rng_states

    def _save_checkpoint(self, step: int) -> None:
        model_state, optimizer_state, rng_states = self._gathered_state()
        if self.accelerator.is_main_process:
            epoch, position = divmod(step, self.steps_per_epoch)
            marker = {"fingerprint": self.fingerprint, "epoch": epoch, "batch_in_epoch": position,
                      "total_steps": self.total_steps, "seed": self.cfg.seed}
            checkpoints.save_checkpoint(self.stage_dir, step, peft_model=self.peft_model, model_state=model_state,
                                        optimizer_state=optimizer_state, scheduler=self.scheduler,
                                        rng_states=rng_states, marker=marker, keep=self.cfg.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _publish_adapter(self) -> int | None:
        """Write the stage's adapter: the best check's (monitor.keep: best, when one is eligible) or the last step's.

        Returns the step whose weights were published (None: the last step's, no monitor)."""
        best = self.monitor.best() if self.monitor and self.monitor.cfg.keep == "best" else None
        best_folder = self.stage_dir / BEST_FOLDER
        if best is not None and is_adapter_folder(best_folder):
            if self.accelerator.is_main_process:
                checkpoints.copy_adapter(best_folder, self.stage_dir)
            self.accelerator.wait_for_everyone()
            return best.step
        model_state, _ = self._trainable_state()
        if self.accelerator.is_main_process:
            checkpoints.publish_adapter(self.stage_dir, self.peft_model, model_state)
        self.accelerator.wait_for_everyone()
        return self.monitor.checks[-1].step if self.monitor and self.monitor.checks else None

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Close the display and trackers and let go of the accelerator's references."""
        self.reporter.close()
        if self.offloaded:
            self.offloaded.close()
        self.accelerator.free_memory()


def run_training(run_dir: RunDir, examples: Sequence[Any], model: nn.Module, cfg: TrainingConfig,
                 objective: Objective, *, stage: str, pad_token_id: int, extra_losses: Sequence[ExtraLoss] = (),
                 callbacks: Sequence[Callable[[dict], None]] = (), console: Any = None,
                 base_model: str | None = None, monitor: TrainingMonitor | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on `model` for `objective` over tokenised `examples`; return the summary."""
    trainer = LoraTrainer(cfg, objective, run_dir, stage=stage, extra_losses=extra_losses, callbacks=callbacks,
                          console=console, base_model=base_model, monitor=monitor)
    trainer.setup(model, examples, pad_token_id)
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
