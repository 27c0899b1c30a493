"""In-process generation with a transformers model and its tokenizer.

    backend = HFBackend(model, tokenizer, batch_size=64)
    backend.load_adapter("runs/pirate/adapters/distill", "distill")
    backend.generate(conversations, sampling, n=5, adapter="distill")   # adapter on
    backend.generate(conversations, sampling)                           # base weights

Features, the flag that controls each, and its cost:

- Batching: prompts (x n samples) are sorted by token length and cut into left-padded batches,
  so padding stays small: `batch_size` rows on CPU; on CUDA up to `gpu_batch_size` rows (default
  256: on an H100, SmolLM2-135M makes ~3x the tokens/s at 256 rows than at 64), fewer when
  the KV cache would not fit in half the free GPU memory (rows x (longest prompt +
  max_new_tokens) x layers x 2 x kv_heads x head_dim x dtype bytes). Batches are static: a batch
  decodes until its last row stops, so rows that stop early idle (no refill).
- Engine (`engine`): "static" = our static-KV-cache loop (decoding.static_decode) with CUDA
  graphs on CUDA (`cuda_graphs`); "generate" = plain `model.generate` on the padded batch;
  "auto" = static where the model supports it (full attention, sdpa/eager), else generate.
- Adapters: with a PEFT model, `adapter=None` runs the base weights inside `disable_adapter()`
  and `adapter="name"` switches that adapter on with `set_adapter`; nothing is reloaded. The
  model's training flag, active adapter and requires_grad flags are restored after each call.
- Stops at end-of-turn: the tokenizer's eos, `<|im_end|>` when the vocabulary has it, and the
  model's generation_config eos ids. Returned text has no special tokens.
- `ignore_eos` (benchmarks only): always generate exactly max_new_tokens.
- Seeding: batch k of a call samples with a generator seeded from (sampling.seed, k), so a fixed
  input and seed give a fixed output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch

from character_baker.backends.generation.base import (Completion, GenerationBackend, Messages, check_request,
                                                      encode_prompt)
from character_baker.backends.generation.decoding import (DecodedRow, DecodeSettings, generate_decode,
                                                          static_decode)
from character_baker.backends.generation.progress import ProgressReporter, open_progress
from character_baker.core.runs import stable_hash

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

Engine = Literal["auto", "static", "generate"]
END_OF_TURN_TOKENS = ("<|im_end|>",)


def is_peft_model(model: Any) -> bool:
    """True when `model` is a PEFT wrapper whose adapters can be switched."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def supports_static_engine(model: Any) -> bool:
    """True for decoder-only models with full attention under the sdpa or eager implementation."""
    config = model.config  # a PEFT wrapper forwards to its base model's config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (getattr(config, "_attn_implementation", "eager") in ("sdpa", "eager") and not sliding
            and layer_types == {"full_attention"} and not getattr(config, "is_encoder_decoder", False))


def stop_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """End-of-turn ids: tokenizer eos, ChatML's <|im_end|> if present, generation_config eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[token] for token in END_OF_TURN_TOKENS if token in vocabulary)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return tuple(sorted(ids))


@contextlib.contextmanager
def adapter_enabled(model: Any, adapter: str | None) -> Iterator[None]:
    """Base weights for None (every adapter disabled on a PEFT model), else the named adapter switched on."""
    if adapter is not None:
        model.set_adapter(adapter)
        yield
    elif is_peft_model(model):
        with model.disable_adapter():
            yield
    else:
        yield


class HFBackend(GenerationBackend):
    """Generation with an in-process transformers model (optionally a PEFT model with adapters)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, gpu_batch_size: int = 256,
                 device: str | None = None, model_id: str | None = None, engine: Engine = "auto",
                 cuda_graphs: bool = True, ignore_eos: bool = False):
        if engine not in ("auto", "static", "generate"):
            raise ValueError(f"engine must be 'auto', 'static' or 'generate', got {engine!r}")
        if engine == "static" and not supports_static_engine(model):
            raise ValueError("engine='static' needs full attention with sdpa/eager: use engine='auto'")
        self.model = model.to(device) if device is not None else model
        self.tokenizer = tokenizer
        self.batch_size, self.gpu_batch_size = batch_size, gpu_batch_size
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.engine = engine
        self.cuda_graphs = cuda_graphs
        self.ignore_eos = ignore_eos

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, path: str | Path, name: str) -> None:
        """Load a PEFT adapter folder under `name` (wrapping the model in PEFT the first time)."""
        if is_peft_model(self.model):
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)

    def adapter_fingerprint(self, adapter: str | None) -> str:
        """sha256 over the adapter's config and current weights ('base' for no adapter)."""
        if adapter is None:
            return "base"
        self._check_adapter(adapter)
        from peft import get_peft_model_state_dict

        digest = hashlib.sha256(json.dumps(self.model.peft_config[adapter].to_dict(), sort_keys=True,
                                           default=str).encode())
        state = get_peft_model_state_dict(self.model, adapter_name=adapter, save_embedding_layers=False)  # no Hub lookup
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def _check_adapter(self, adapter: str) -> None:
        if not is_peft_model(self.model):
            raise ValueError(f"adapter {adapter!r} requested but the model has no adapters: call load_adapter first")
        if adapter not in self.model.peft_config:
            raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self.model.peft_config)}")

    @contextlib.contextmanager
    def _generation_mode(self, adapter: str | None) -> Iterator[None]:
        """Eval and inference mode, with base weights (adapter None) or the named adapter switched on.

        The training flag, the active adapter and every requires_grad flag are restored afterwards,
        so a model shared with a trainer is left exactly as it was found.
        """
        if adapter is not None:
            self._check_adapter(adapter)
        peft = is_peft_model(self.model)
        saved = (self.model.training, self.model.active_adapter if peft else None,
                 [(parameter, parameter.requires_grad) for parameter in self.model.parameters()])
        self.model.eval()
        try:
            with adapter_enabled(self.model, adapter), torch.inference_mode():
                yield
        finally:
            self._restore(*saved)

    def _restore(self, training: bool, active_adapter: str | None, grad_flags: list) -> None:
        self.model.train(training)
        if active_adapter is not None:
            self.model.set_adapter(active_adapter)
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)

    # ------------------------------------------------------------------ generation
    def generate(self, conversations: list[Messages], sampling: "SamplingConfig", n: int = 1, *,
                 adapter: str | None = None,
                 progress: "str | ProgressReporter | None" = None) -> list[list[Completion]]:
        """n completions per conversation, in input order (see the module docstring)."""
        check_request(conversations, n)
        if not conversations:
            return []
        prompts = [encode_prompt(self.tokenizer, conversation) for conversation in conversations]
        rows = sorted(((index, sample) for index in range(len(prompts)) for sample in range(n)),
                      key=lambda row: len(prompts[row[0]]))
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        settings = self._settings(sampling)
        rows_per_batch = self.rows_per_batch(max(map(len, prompts)) + sampling.max_new_tokens)
        with open_progress(progress, len(rows)) as reporter, self._generation_mode(adapter):
            for number, start in enumerate(range(0, len(rows), rows_per_batch)):
                batch = rows[start:start + rows_per_batch]
                batch_prompts = [prompts[index] for index, _ in batch]
                decoded = self._decode_batch(batch_prompts, settings, seed=_batch_seed(sampling.seed, number))
                for (index, sample), prompt, row in zip(batch, batch_prompts, decoded):
                    results[index][sample] = self._completion(prompt, row)
                reporter.advance(len(batch), sum(len(row.token_ids) + row.stopped for row in decoded))
        return results  # type: ignore[return-value]

    def rows_per_batch(self, sequence_length: int) -> int:
        """`batch_size` on CPU; on CUDA `gpu_batch_size`, capped so the KV cache fits in half the free memory."""
        device = self.model.get_input_embeddings().weight.device
        if device.type != "cuda":
            return self.batch_size
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        element = self.model.get_input_embeddings().weight.element_size()
        row_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * element * sequence_length
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return max(1, min(self.gpu_batch_size, free_bytes // 2 // row_bytes))

    def _settings(self, sampling: "SamplingConfig") -> DecodeSettings:
        pad_id = self.tokenizer.pad_token_id
        eos_ids = stop_token_ids(self.tokenizer, self.model)
        return DecodeSettings(temperature=sampling.temperature, top_p=sampling.top_p,
                              repetition_penalty=sampling.repetition_penalty,
                              max_new_tokens=sampling.max_new_tokens, eos_ids=eos_ids,
                              pad_id=pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0),
                              ignore_eos=self.ignore_eos, cuda_graphs=self.cuda_graphs)

    def _decode_batch(self, prompts: list[list[int]], settings: DecodeSettings, seed: int) -> list[DecodedRow]:
        use_static = self.engine == "static" or (self.engine == "auto" and supports_static_engine(self.model))
        return (static_decode if use_static else generate_decode)(self.model, prompts, settings, seed)

    def _completion(self, prompt: list[int], row: DecodedRow) -> Completion:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(row.token_ids) + row.stopped,
                          finish_reason="stop" if row.stopped else "length")

    def label_logprobs(self, conversations: list[Messages], labels: Any, *,
                       adapter: str | None = None) -> list[dict[str, float] | None]:
        """Exact log-probs of each label as the reply's first tokens (`choices.hf_label_logprobs`)."""
        from character_baker.backends.generation.choices import hf_label_logprobs, labels_per_conversation

        check_request(conversations, 1)
        if adapter is not None:
            self._check_adapter(adapter)
        rows = labels_per_conversation(labels, len(conversations))
        return hf_label_logprobs(self.model, self.tokenizer, conversations, rows, adapter, self.batch_size)


def _batch_seed(seed: int, batch_number: int) -> int:
    return int(stable_hash([seed, batch_number]), 16) % (2**63)

