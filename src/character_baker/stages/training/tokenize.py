"""Chat-template tokenisation with loss masks.

Every example is rendered with the tokenizer's own chat template, exactly as the model will
see it at inference. The loss mask is 1 on the tokens the model must learn to produce:

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nAhoy!<|im_end|>\\n
    0 0 0 ...                                              1 1 1 1 1 ... 1   0
                                                           ^ response  ^ end-of-turn (learn to stop)
                                                                             ^ template tail

- An assistant turn starts where the rendering of the conversation *before* it, with the
  generation prompt, ends; those prompt tokens must be a token-for-token prefix of the full
  rendering (checked; a template that renders a prompt differently on its own is an error,
  because the model would be trained on a context it never sees at inference).
- The turn ends at its end-of-turn token: the first special token after the response
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>` ...), included in the mask. Whatever the
  template adds after it (a newline) is masked out.
- Multi-turn conversations (SFT) get every assistant turn masked in, nothing else.
- Examples longer than `max_length` tokens are dropped and counted, never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from character_baker.core.errors import UserError

TEMPLATE_FIELD = "models.chat_template"


@dataclass(frozen=True)
class TokenizedSequence:
    """One rendered conversation: token ids and a 0/1 loss mask of the same length."""

    id: str
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens the loss is computed on."""
        return sum(self.loss_mask)


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair: the same prompt answered twice (chosen, rejected)."""

    id: str
    chosen: TokenizedSequence
    rejected: TokenizedSequence

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def render_ids(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered by the chat template (special tokens only where the template puts them)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token (end-of-turn candidates)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


def _template_error(message: str, fix: str) -> UserError:
    return UserError.single("<chat template>", TEMPLATE_FIELD, message, fix)


def _turn_span(tokenizer: Any, full_ids: list[int], prompt_ids: list[int], content: str,
               specials: frozenset[int]) -> tuple[int, int]:
    """[start, end) of one assistant turn in `full_ids`: the response and its end-of-turn token."""
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        raise _template_error(
            "the prompt rendered alone (with the generation prompt) is not a token prefix of the conversation "
            f"rendered with the answer; they differ at {tokenizer.decode(full_ids[:start][-8:])!r} vs "
            f"{tokenizer.decode(prompt_ids[-8:])!r}",
            "use a chat template whose generation prompt is exactly how an assistant turn starts")
    end = next((i for i in range(start, len(full_ids)) if full_ids[i] in specials), None)
    if end is None:
        raise _template_error("the chat template closes the assistant turn without a special end-of-turn token, "
                              "so the model could not learn to stop",
                              "use a chat template that ends each assistant turn with the EOS/end-of-turn token")
    if content.strip() and content.strip() not in tokenizer.decode(full_ids[start:end]):
        raise _template_error("the chat template changed or dropped the assistant's answer "
                              f"(expected {content.strip()[:60]!r} between the generation prompt and end-of-turn)",
                              "use a chat template that renders assistant messages verbatim")
    return start, end + 1


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict], example_id: str = "",
                          last_turn_only: bool = False) -> TokenizedSequence:
    """Render a conversation; the mask covers every assistant turn (or only the last one)."""
    full_ids = render_ids(tokenizer, messages)
    specials = special_token_ids(tokenizer)
    mask = [0] * len(full_ids)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise ValueError(f"example {example_id!r} has no assistant turn to train on")
    for turn in turns[-1:] if last_turn_only else turns:
        prompt_ids = render_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        start, end = _turn_span(tokenizer, full_ids, prompt_ids, messages[turn]["content"], specials)
        mask[start:end] = [1] * (end - start)
    return TokenizedSequence(example_id, tuple(full_ids), tuple(mask))


def tokenize_pair(tokenizer: Any, record: dict) -> TokenizedPair:
    """A distill record {id, messages, chosen, rejected} as two masked sequences sharing the prompt."""
    def answered(response: str) -> TokenizedSequence:
        messages = [*record["messages"], {"role": "assistant", "content": response}]
        return tokenize_conversation(tokenizer, messages, record["id"], last_turn_only=True)

    return TokenizedPair(record["id"], answered(record["chosen"]), answered(record["rejected"]))


def _fits(example: TokenizedSequence | TokenizedPair, max_length: int) -> bool:
    if isinstance(example, TokenizedPair):
        return max(len(example.chosen), len(example.rejected)) <= max_length
    return len(example) <= max_length


def keep_within(examples: Iterable[TokenizedSequence | TokenizedPair], max_length: int) -> tuple[list, int]:
    """The examples no longer than `max_length` tokens (per sequence) and how many were dropped."""
    examples = list(examples)
    kept = [example for example in examples if _fits(example, max_length)]
    return kept, len(examples) - len(kept)


def tokenize_preferences(tokenizer: Any, records: Iterable[dict], max_length: int) -> tuple[list[TokenizedPair], int]:
    """Tokenise distill records into pairs; drop (and count) pairs with a sequence over `max_length`."""
    return keep_within((tokenize_pair(tokenizer, record) for record in records), max_length)


def tokenize_conversations(tokenizer: Any, records: Iterable[dict], max_length: int) -> tuple[list[TokenizedSequence], int]:
    """Tokenise SFT records {id, messages}; every assistant turn is trained on; drop over-long ones."""
    sequences = (tokenize_conversation(tokenizer, record["messages"], record["id"]) for record in records)
    return keep_within(sequences, max_length)
