"""In-process vLLM (`vllm.LLM`): paged attention and continuous batching, LoRA per request.

- The engine starts at the first `generate` call, so adapters loaded before it decide
  `enable_lora`, `max_loras` and `max_lora_rank` (the largest adapter `r`, rounded up to a rank
  vLLM supports). Pass `max_lora_rank` to allow adapters loaded later.
- Prompts are rendered with the model's chat template here (prefill = continue_final_message)
  and sent as token ids, so vLLM adds no second BOS.
- `n` samples come from one request (SamplingParams.n) seeded with sampling.seed.
- Label log-probs: exact, one request per (conversation, label) whose prompt is the rendered
  prompt plus the label's tokens, read back with SamplingParams(prompt_logprobs=0, max_tokens=1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from character_baker.backends.generation.base import Completion, GenerationBackend, Messages, check_request, \
    encode_prompt
from character_baker.backends.generation.progress import ProgressReporter, open_progress
from character_baker.core.errors import UserError
from character_baker.core.runs import file_hash

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vllm LoRAConfig's allowed max_lora_rank values


def import_vllm() -> Any:
    """The vllm module, or a UserError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError.single("recipe", "generation.<role>.backend",
                               "the vllm backend needs vLLM, which is not installed",
                               fix="pip install 'character-baker[vllm]' (Linux with a CUDA GPU), or use backend: hf"
                               ) from None
    return vllm


def lora_rank_limit(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that fits an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError.single("recipe", "training.lora.r",
                           f"LoRA rank {rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}",
                           fix="use a smaller rank, or the hf backend")


@dataclass(frozen=True)
class _Adapter:
    number: int  # vLLM's lora_int_id: unique, from 1
    path: str
    rank: int


class VLLMBackend(GenerationBackend):
    """Generation with an in-process vLLM engine."""

    name = "vllm"

    def __init__(self, model: str, *, model_id: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_lora_rank: int | None = None,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 trust_remote_code: bool = False, chunk_size: int = 1024, ignore_eos: bool = False):
        self._vllm = import_vllm()
        self.model_id = model_id or model
        self.engine_options: dict[str, Any] = dict(model=model, dtype=dtype, seed=seed,
                                                   trust_remote_code=trust_remote_code,
                                                   gpu_memory_utilization=gpu_memory_utilization)
        if max_model_len is not None:
            self.engine_options["max_model_len"] = max_model_len
        self.max_lora_rank = max_lora_rank
        self.chunk_size = chunk_size
        self.ignore_eos = ignore_eos
        self.adapters: dict[str, _Adapter] = {}
        self._llm: Any = None

    def load_adapter(self, path: str | Path, name: str) -> None:
        """Register a PEFT adapter folder under `name` (read by vLLM on first use)."""
        rank = int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
        if self._llm is not None and (self.max_lora_rank is None or rank > self.max_lora_rank):
            raise UserError.single(str(path), "r", f"adapter {name!r} (rank {rank}) was loaded after the vLLM "
                                   "engine started without room for it",
                                   fix="load adapters before generating, or pass max_lora_rank")
        self.adapters[name] = _Adapter(number=len(self.adapters) + 1, path=str(path), rank=rank)

    def adapter_fingerprint(self, adapter: str | None) -> str:
        """Hash of the adapter folder's files ('base' for none)."""
        return "base" if adapter is None else file_hash(self._adapter(adapter).path)

    def _adapter(self, name: str) -> _Adapter:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters)}")
        return self.adapters[name]

    def engine_arguments(self) -> dict[str, Any]:
        """Keyword arguments for vllm.LLM, LoRA settings included."""
        ranks = [a.rank for a in self.adapters.values()] + ([self.max_lora_rank] if self.max_lora_rank else [])
        if not ranks:
            return dict(self.engine_options)
        self.max_lora_rank = lora_rank_limit(max(ranks))
        return {**self.engine_options, "enable_lora": True, "max_lora_rank": self.max_lora_rank,
                "max_loras": max(1, len(self.adapters))}

    @property
    def llm(self) -> Any:
        """The vllm.LLM engine, started on first use."""
        if self._llm is None:
            self._llm = self._vllm.LLM(**self.engine_arguments())
        return self._llm

    def sampling_params(self, sampling: "SamplingConfig", n: int) -> Any:
        """vllm.SamplingParams for one call."""
        return self._vllm.SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                         repetition_penalty=sampling.repetition_penalty,
                                         max_tokens=sampling.max_new_tokens, seed=sampling.seed,
                                         ignore_eos=self.ignore_eos, skip_special_tokens=True)

    def lora_request(self, adapter: str | None) -> Any:
        """vllm LoRARequest for an adapter name (None for base weights)."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        entry = self._adapter(adapter)
        return LoRARequest(adapter, entry.number, entry.path)

    def generate(self, conversations: list[Messages], sampling: "SamplingConfig", n: int = 1, *,
                 adapter: str | None = None,
                 progress: "str | ProgressReporter | None" = None) -> list[list[Completion]]:
        """n completions per conversation, in input order."""
        check_request(conversations, n)
        lora, params = self.lora_request(adapter), self.sampling_params(sampling, n)
        tokenizer = self.llm.get_tokenizer()
        results: list[list[Completion]] = []
        with open_progress(progress, len(conversations) * n) as reporter:
            for start in range(0, len(conversations), self.chunk_size):
                prompts = [{"prompt_token_ids": encode_prompt(tokenizer, c)}
                           for c in conversations[start:start + self.chunk_size]]
                outputs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                chunk = [_completions(output) for output in outputs]
                reporter.advance(len(chunk) * n, sum(c.completion_tokens for row in chunk for c in row))
                results.extend(chunk)
        return results


    def label_logprobs(self, conversations: list[Messages], labels: Any, *,
                       adapter: str | None = None) -> list[dict[str, float] | None]:
        """Exact log-probs of each label as the reply's first tokens, from prompt log-probs."""
        from character_baker.backends.generation.choices import (label_pairs, labels_per_conversation,
                                                                  prompt_label_logprob, regroup)

        check_request(conversations, 1)
        rows = labels_per_conversation(labels, len(conversations))
        pairs = label_pairs(self.llm.get_tokenizer(), conversations, rows)
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": prompt + label} for prompt, label in pairs], params,
                                    lora_request=self.lora_request(adapter), use_tqdm=False)
        scores = [prompt_label_logprob(output.prompt_logprobs, prompt + label, len(prompt))
                  for output, (prompt, label) in zip(outputs, pairs)]
        return regroup(scores, rows)


def _completions(output: Any) -> list[Completion]:
    """Completions of one vllm RequestOutput."""
    prompt_tokens = len(output.prompt_token_ids or [])
    return [Completion(text=sample.text, prompt_tokens=prompt_tokens, completion_tokens=len(sample.token_ids),
                       finish_reason="length" if sample.finish_reason == "length" else "stop")
            for sample in output.outputs]
