"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM's server, llama.cpp, ...) through the official SDK.

- `n` > 1: asks for `n` choices; a server that returns fewer (some ignore `n`) is asked again
  for the rest, each top-up request with its own seed (seed + samples so far) so the samples differ.
- Prefill: a conversation ending on an assistant message is sent as-is; what the server does
  with it is the server's (vLLM continues it when started with continue_final_message).
- Adapters: `adapter="name"` sends `model="name"` (how vLLM's server exposes LoRA adapters).
- Token counts come from `usage`; with several choices the completion tokens are split evenly.
- Key: from the env var named by `api_key_env`; without one, OPENAI_API_KEY if set, else a
  placeholder (local servers need none).
- Label log-probs (constrained judge verdicts): one greedy request per conversation with
  `max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS`; the first token's top list is mapped
  to the labels by `choices.first_token_label_logprobs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from character_baker.backends.generation.base import Completion, Messages
from character_baker.backends.generation.http_base import HTTPBackend, api_key_from_env

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

NO_KEY = "not-needed"
TOP_LOGPROBS = 20  # the most OpenAI's API returns


class OpenAIBackend(HTTPBackend):
    """Chat completions from an OpenAI-compatible endpoint, `max_concurrency` requests at a time."""

    name = "openai"
    supports_label_logprobs = True

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 max_concurrency: int = 8, max_retries: int = 4, timeout_s: float = 120.0,
                 retry_base_delay_s: float = 1.0):
        import openai

        super().__init__(model, max_concurrency=max_concurrency, max_retries=max_retries, timeout_s=timeout_s,
                         retry_base_delay_s=retry_base_delay_s)
        self.base_url = base_url
        api_key = api_key_from_env(api_key_env, default_variable="OPENAI_API_KEY") or NO_KEY
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        return (self._openai.APITimeoutError, self._openai.APIConnectionError)

    def _complete(self, messages: Messages, sampling: "SamplingConfig", count: int, first_sample: int,
                  adapter: str | None) -> list[Completion]:
        """Ask for `count` choices, topping up while the server returns fewer."""
        completions: list[Completion] = []
        while len(completions) < count:
            wanted, seed = count - len(completions), sampling.seed + first_sample + len(completions)
            response = self.with_retries(lambda: self._request(messages, sampling, wanted, seed, adapter))
            if not response.choices:
                raise RuntimeError(f"{self.base_url} returned no choices for model {self.model_id!r}")
            completions.extend(_completions(response)[:wanted])
        return completions

    def _request(self, messages: Messages, sampling: "SamplingConfig", n: int, seed: int, adapter: str | None) -> Any:
        options: dict[str, Any] = dict(model=adapter or self.model_id, messages=messages, n=n, seed=seed,
                                       temperature=sampling.temperature, top_p=sampling.top_p,
                                       max_tokens=sampling.max_new_tokens)
        return self.client.chat.completions.create(**options)

    def _label_logprobs(self, messages: Messages, labels: Sequence[str],
                        adapter: str | None) -> dict[str, float] | None:
        """The first reply token's top log-probs, mapped to the labels (None when none names a label)."""
        from character_baker.backends.generation.choices import first_token_label_logprobs

        response = self.with_retries(lambda: self.client.chat.completions.create(
            model=adapter or self.model_id, messages=messages, max_tokens=1, temperature=0.0, logprobs=True,
            top_logprobs=TOP_LOGPROBS))
        content = getattr(response.choices[0].logprobs, "content", None) if response.choices else None
        if not content:
            return None
        return first_token_label_logprobs([(entry.token, entry.logprob) for entry in content[0].top_logprobs], labels)


def _completions(response: Any) -> list[Completion]:
    """One Completion per choice, with usage split evenly between choices."""
    usage = response.usage
    prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
    completion_tokens = (getattr(usage, "completion_tokens", 0) or 0) // len(response.choices)
    return [Completion(text=choice.message.content or "", prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens,
                       finish_reason="length" if choice.finish_reason == "length" else "stop")
            for choice in response.choices]
