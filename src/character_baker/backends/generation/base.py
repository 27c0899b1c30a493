"""The one interface every generation backend implements, and helpers they share.

    backend.generate(conversations, sampling, n=5, adapter="distill", progress="teacher")
      -> [[Completion x n] per conversation, in input order]

    backend.label_logprobs(conversations, ["yes", "no"])
      -> [{"yes": -0.2, "no": -1.7} per conversation] (None where the backend has no log-probs)

A conversation is an OpenAI-style list of `{"role", "content"}` messages. When its last
message is from the assistant, the backend continues that message (prefill) and returns only
the continuation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

if TYPE_CHECKING:
    from character_baker.backends.generation.progress import ProgressReporter
    from character_baker.core.config import SamplingConfig

Messages = list[dict[str, str]]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text and token counts, and why generation stopped."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the response-cache format)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Completion":
        """Inverse of `to_dict`."""
        return cls(**data)


class GenerationBackend(ABC):
    """Turns conversations into completions. Subclasses set `name` and `model_id`."""

    name: str = "base"
    model_id: str = ""

    @abstractmethod
    def generate(self, conversations: list[Messages], sampling: "SamplingConfig", n: int = 1, *,
                 adapter: str | None = None,
                 progress: "str | ProgressReporter | None" = None) -> list[list[Completion]]:
        """n completions per conversation, in input order.

        `adapter` names a LoRA adapter to switch on (None = base weights); `progress` is a label
        for a progress display, or a reporter to advance (None = silent).
        """

    def adapter_fingerprint(self, adapter: str | None) -> str:
        """A string that changes whenever the adapter's weights or config change ('base' for none)."""
        return "base" if adapter is None else f"name:{adapter}"

    def label_logprobs(self, conversations: list[Messages], labels: Sequence[str] | Sequence[Sequence[str]], *,
                       adapter: str | None = None) -> list[dict[str, float] | None] | None:
        """Per conversation, the log-probability of each option label as the reply's first token(s).

        `labels` is one list for all conversations or one per conversation. Returns None when this
        backend cannot read log-probabilities (the caller then asks for free text); a None entry
        means that conversation's reply named no label. See `choices` for how each backend reads them.
        """
        return None


def is_prefill(conversation: Messages) -> bool:
    """True when the conversation ends on an assistant message that the model should continue."""
    return bool(conversation) and conversation[-1].get("role") == "assistant"


def render_prompt(tokenizer: Any, conversation: Messages) -> str:
    """The chat-template text the model continues: a new assistant turn, or the open prefill turn."""
    if is_prefill(conversation):
        return tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, conversation: Messages) -> list[int]:
    """Token ids of `render_prompt` (the template already holds any special tokens it needs)."""
    return list(tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"])


def check_request(conversations: list[Messages], n: int) -> None:
    """Reject malformed requests up front with a message that says what is wrong."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    for index, conversation in enumerate(conversations):
        if not conversation:
            raise ValueError(f"conversation {index} is empty")
        for message in conversation:
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"conversation {index} has a malformed message {message!r}: "
                                 "need role system/user/assistant and string content")
