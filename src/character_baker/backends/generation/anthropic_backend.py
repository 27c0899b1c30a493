"""Anthropic's Messages API through the official SDK.

- System messages are joined into the `system` parameter; the rest go in `messages`.
- Prefill is native: a final assistant message is continued (its trailing whitespace is
  removed, which the API requires), and only the continuation comes back.
- The API has no `n`: n samples are n requests, run in parallel under `max_concurrency`.
- Sampling: current models take no sampling parameters (the 2.x SDK has none), so by default
  only max_new_tokens is sent; `send_temperature=True` adds `temperature` (via extra_body) for
  models that still accept it. top_p is never sent (the API allows temperature or top_p, not both).
- Key: from the env var named by `api_key_env`, else ANTHROPIC_API_KEY; missing -> UserError.
- Label log-probs: the API returns none, so `label_logprobs` is None and judges parse free text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from character_baker.backends.generation.base import Completion, Messages, is_prefill
from character_baker.backends.generation.http_base import HTTPBackend, api_key_from_env

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

DEFAULT_KEY_VARIABLE = "ANTHROPIC_API_KEY"


def split_system(messages: Messages) -> tuple[str, list[dict[str, str]]]:
    """(system text, the other messages), with a prefilled last turn stripped of trailing whitespace."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    if is_prefill(turns):
        turns[-1]["content"] = turns[-1]["content"].rstrip()
    return system, turns


class AnthropicBackend(HTTPBackend):
    """Messages from the Anthropic API, one request per sample, `max_concurrency` at a time."""

    name = "anthropic"
    one_sample_per_request = True
    supports_adapters = False

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 max_concurrency: int = 8, max_retries: int = 4, timeout_s: float = 120.0,
                 retry_base_delay_s: float = 1.0, send_temperature: bool = False):
        import anthropic

        super().__init__(model, max_concurrency=max_concurrency, max_retries=max_retries, timeout_s=timeout_s,
                         retry_base_delay_s=retry_base_delay_s)
        api_key = api_key_from_env(api_key_env or DEFAULT_KEY_VARIABLE)
        self._anthropic = anthropic
        self.send_temperature = send_temperature
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0)

    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        return (self._anthropic.APITimeoutError, self._anthropic.APIConnectionError)

    def _complete(self, messages: Messages, sampling: "SamplingConfig", count: int, first_sample: int,
                  adapter: str | None) -> list[Completion]:
        """`count` requests for one conversation (the API has no `n`)."""
        return [_completion(self.with_retries(lambda: self._request(messages, sampling))) for _ in range(count)]

    def _request(self, messages: Messages, sampling: "SamplingConfig") -> Any:
        system, turns = split_system(messages)
        options: dict[str, Any] = dict(model=self.model_id, max_tokens=sampling.max_new_tokens, messages=turns)
        if system:
            options["system"] = system
        if self.send_temperature:
            options["extra_body"] = {"temperature": sampling.temperature}
        return self.client.messages.create(**options)


def _completion(message: Any) -> Completion:
    """A Completion from a Messages API response."""
    text = "".join(block.text for block in message.content if getattr(block, "type", "") == "text")
    return Completion(text=text, prompt_tokens=message.usage.input_tokens,
                      completion_tokens=message.usage.output_tokens,
                      finish_reason="length" if message.stop_reason == "max_tokens" else "stop")
