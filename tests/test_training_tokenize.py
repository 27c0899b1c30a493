"""Chat-template tokenisation: which tokens carry the loss, and template checks."""

from __future__ import annotations

import pytest

from character_baker.core.errors import UserError
from character_baker.stages.training.tokenize import (tokenize_conversation, tokenize_conversations, tokenize_pair,
                                                      tokenize_preferences)


def masked_spans(sequence):
    """Consecutive runs of masked positions as (start, end) pairs."""
    spans, start = [], None
    for index, bit in enumerate(list(sequence.loss_mask) + [0]):
        if bit and start is None:
            start = index
        if not bit and start is not None:
            spans.append((start, index))
            start = None
    return spans


def record(chosen="Arr, I be the captain.", rejected="I am a helpful assistant.", prompt="Who are you?", rid="r1"):
    return {"id": rid, "prompt_id": "p1", "messages": [{"role": "user", "content": prompt}],
            "chosen": chosen, "rejected": rejected, "provenance": {}}


def test_mask_covers_response_and_end_of_turn_but_not_prompt_or_tail(tiny_tok):
    pair = tokenize_pair(tiny_tok, record())
    sequence = pair.chosen
    end_of_turn = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    [(start, end)] = masked_spans(sequence)
    assert tiny_tok.decode(sequence.input_ids[start:end]) == "Arr, I be the captain.<|im_end|>"
    assert sequence.input_ids[end - 1] == end_of_turn
    prompt_text = tiny_tok.decode(sequence.input_ids[:start])
    assert prompt_text == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    # The template's trailing newline after <|im_end|> is rendered but not trained on.
    assert tiny_tok.decode(sequence.input_ids[end:]) == "\n"
    assert sequence.loss_mask[end:] == (0,) * (len(sequence) - end)
    # The prompt's own <|im_end|> (closing the user turn) is not in the mask.
    assert end_of_turn in sequence.input_ids[:start]


def test_chosen_and_rejected_share_the_prompt_tokens(tiny_tok):
    pair = tokenize_pair(tiny_tok, record())
    start_c = masked_spans(pair.chosen)[0][0]
    start_r = masked_spans(pair.rejected)[0][0]
    assert start_c == start_r and pair.chosen.input_ids[:start_c] == pair.rejected.input_ids[:start_r]
    assert tiny_tok.decode([t for t, m in zip(pair.rejected.input_ids, pair.rejected.loss_mask) if m]) == \
        "I am a helpful assistant.<|im_end|>"


def test_multi_turn_masks_every_assistant_turn_and_nothing_else(tiny_tok):
    messages = [{"role": "system", "content": "You are Captain Ahab."},
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "The captain of this ship."},
                {"role": "user", "content": "Tell me more."},
                {"role": "assistant", "content": "Arr, the sea is wide."}]
    sequence = tokenize_conversation(tiny_tok, messages, "c1")
    spans = masked_spans(sequence)
    assert [tiny_tok.decode(sequence.input_ids[s:e]) for s, e in spans] == \
        ["The captain of this ship.<|im_end|>", "Arr, the sea is wide.<|im_end|>"]
    unmasked = tiny_tok.decode([t for t, m in zip(sequence.input_ids, sequence.loss_mask) if not m])
    assert unmasked == ("<|im_start|>system\nYou are Captain Ahab.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
                        "<|im_start|>assistant\n\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n\n")
    last_only = tokenize_conversation(tiny_tok, messages, "c1", last_turn_only=True)
    assert [tiny_tok.decode(last_only.input_ids[s:e]) for s, e in masked_spans(last_only)] == \
        ["Arr, the sea is wide.<|im_end|>"]


def test_over_long_examples_are_dropped_and_counted(tiny_tok):
    records = [record(rid="short"), record(chosen="Ahoy " * 200, rid="long")]
    pairs, dropped = tokenize_preferences(tiny_tok, records, max_length=64)
    assert [p.id for p in pairs] == ["short"] and dropped == 1
    conversations = [{"id": r["id"], "messages": [*r["messages"], {"role": "assistant", "content": r["chosen"]}]}
                     for r in records]
    sequences, dropped = tokenize_conversations(tiny_tok, conversations, max_length=64)
    assert [s.id for s in sequences] == ["short"] and dropped == 1


def _with_template(tokenizer, template):
    from character_baker.testing import tiny_tokenizer

    other = tiny_tokenizer()
    other.chat_template = template
    return other


def test_prompt_that_is_not_a_prefix_of_the_full_rendering_is_an_error(tiny_tok):
    # The generation prompt says "assistant" but answered turns are rendered as "model": the model
    # would be trained on a context it never sees at inference.
    template = ("{% for m in messages %}<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(UserError) as info:
        tokenize_pair(_with_template(tiny_tok, template), record())
    assert "models.chat_template" in str(info.value) and "prefix" in str(info.value)


def test_template_without_end_of_turn_token_is_an_error(tiny_tok):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError) as info:
        tokenize_pair(_with_template(tiny_tok, template), record())
    assert "end-of-turn" in str(info.value)
