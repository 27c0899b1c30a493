"""The in-process hf backend on tiny random Llama and Qwen2 models (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from character_baker.backends.generation.base import encode_prompt, render_prompt
from character_baker.backends.generation.decoding import packed_gqa_sdpa, sample_tokens
from character_baker.backends.generation.hf import HFBackend, stop_token_ids, supports_static_engine
from character_baker.core.config import SamplingConfig

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a pirate captain."},
     {"role": "user", "content": "Write a poem about the ocean, the wind and the ship."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def reference_text(model, tokenizer, conversation, max_new_tokens, eos_ids=None) -> str:
    """Greedy continuation of one unpadded prompt by plain `model.generate`."""
    ids = torch.tensor([encode_prompt(tokenizer, conversation)])
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eos_ids or [-1],
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_greedy_batched_equals_unbatched_reference(tiny_lm, engine):
    model, tokenizer = tiny_lm
    results = HFBackend(model, tokenizer, batch_size=8, engine=engine).generate(CONVERSATIONS, GREEDY)
    eos = list(stop_token_ids(tokenizer, model))
    for conversation, (completion,) in zip(CONVERSATIONS, results):
        assert completion.text == reference_text(model, tokenizer, conversation, GREEDY.max_new_tokens, eos)


def test_n_completions_per_conversation_in_input_order(tiny_lm):
    model, tokenizer = tiny_lm
    backend = HFBackend(model, tokenizer, batch_size=4)  # 9 rows -> 3 batches, sorted by length
    results = backend.generate(CONVERSATIONS, GREEDY, n=3)
    assert [len(row) for row in results] == [3, 3, 3]
    for conversation, row in zip(CONVERSATIONS, results):
        alone = backend.generate([conversation], GREEDY)[0][0]
        assert row == [alone] * 3
        assert alone.prompt_tokens == len(encode_prompt(tokenizer, conversation))


def test_stops_at_end_of_turn_without_special_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    long = SamplingConfig(temperature=0.0, max_new_tokens=16)
    prompt = torch.tensor([encode_prompt(tokenizer, CONVERSATIONS[0])])
    with torch.no_grad():
        free_run = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=3, eos_token_id=[-1], pad_token_id=tokenizer.pad_token_id)
    third_token = int(free_run[0, -1])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> win wherever the third token would have
        model.lm_head.weight[end_of_turn] = model.lm_head.weight[third_token] * 1.01
    results = HFBackend(model, tokenizer).generate(CONVERSATIONS, long)
    first = results[0][0]
    assert first.finish_reason == "stop" and first.completion_tokens <= 3
    eos = list(stop_token_ids(tokenizer, model))
    for conversation, (completion,) in zip(CONVERSATIONS, results):
        assert "<|im_end|>" not in completion.text and "<|im_start|>" not in completion.text
        assert completion.text == reference_text(model, tokenizer, conversation, long.max_new_tokens, eos)


def test_length_finish_reason_and_ignore_eos(tiny_lm):
    model, tokenizer = tiny_lm
    short = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=5, seed=1)
    results = HFBackend(model, tokenizer, ignore_eos=True).generate(CONVERSATIONS, short, n=2)
    assert all(c.finish_reason == "length" and c.completion_tokens == 5 for row in results for c in row)


def test_prefill_continues_the_assistant_message(tiny_lm):
    model, tokenizer = tiny_lm
    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Ahoy, I be"}]
    assert render_prompt(tokenizer, conversation).endswith("Ahoy, I be")
    completion = HFBackend(model, tokenizer).generate([conversation], GREEDY)[0][0]
    eos = list(stop_token_ids(tokenizer, model))
    assert completion.text == reference_text(model, tokenizer, conversation, GREEDY.max_new_tokens, eos)
    assert not completion.text.startswith("Ahoy")


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny_lm):
    model, tokenizer = tiny_lm
    backend = HFBackend(model, tokenizer)
    hot = SamplingConfig(temperature=1.5, top_p=1.0, max_new_tokens=10, seed=7)
    first, again = backend.generate(CONVERSATIONS, hot, n=2), backend.generate(CONVERSATIONS, hot, n=2)
    assert first == again
    assert first != backend.generate(CONVERSATIONS, hot.model_copy(update={"seed": 8}), n=2)
    assert any(row[0].text != row[1].text for row in first)
    nucleus_of_one = SamplingConfig(temperature=0.7, top_p=1e-6, max_new_tokens=10)
    assert backend.generate(CONVERSATIONS, nucleus_of_one) == backend.generate(
        CONVERSATIONS, GREEDY.model_copy(update={"max_new_tokens": 10}))


def test_generate_engine_samples_with_our_sampler(tiny_lm):
    """Both engines draw from `sampling.sample_tokens` with the same generator: same seed, same tokens."""
    model, tokenizer = tiny_lm
    hot = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)
    static = HFBackend(model, tokenizer, engine="static").generate(CONVERSATIONS, hot, n=2)
    generate = HFBackend(model, tokenizer, engine="generate").generate(CONVERSATIONS, hot, n=2)
    assert static == generate
    assert any(row[0].text != row[1].text for row in static)


def test_sample_tokens_follows_temperature_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_tokens(logits, 1.0, 1.0, generator), minlength=3).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)
    nucleus = torch.bincount(sample_tokens(logits, 1.0, 0.7, generator), minlength=3).float() / 20000
    assert nucleus[2] == 0 and torch.allclose(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.02)
    assert sample_tokens(logits[:2], 0.0, 0.5, None).tolist() == [0, 0]


def test_packed_gqa_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    mask = torch.zeros(3, 1, 1, 10)
    mask[0, ..., :4] = torch.finfo(torch.float32).min  # left padding of row 0
    ours, _ = packed_gqa_sdpa(None, query, key, value, mask, scaling=0.3)
    keys, values = key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1)
    weights = torch.softmax(query @ keys.transpose(-1, -2) * 0.3 + mask, dim=-1)
    assert torch.allclose(ours, (weights @ values).transpose(1, 2), atol=1e-5)


def test_static_engine_restores_the_attention_implementation(tiny_lm):
    model, tokenizer = tiny_lm
    before = model.config._attn_implementation
    HFBackend(model, tokenizer).generate(CONVERSATIONS[:1], GREEDY)
    assert model.config._attn_implementation == before


def _lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config, adapter_name="persona")


def test_adapter_on_differs_and_off_equals_base(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    base = HFBackend(model, tokenizer).generate(CONVERSATIONS, GREEDY)
    backend = HFBackend(_lora(model), tokenizer)
    assert backend.generate(CONVERSATIONS, GREEDY, adapter=None) == base
    adapted = backend.generate(CONVERSATIONS, GREEDY, adapter="persona")
    assert adapted != base
    assert backend.generate(CONVERSATIONS, GREEDY) == base  # switching back needs no reload

    backend.model.save_pretrained(tmp_path / "persona", selected_adapters=["persona"])
    arch = type(model).__name__.lower().replace("forcausallm", "")
    from character_baker.testing import tiny_model

    fresh = HFBackend(tiny_model(arch, tokenizer), tokenizer)
    fresh.load_adapter(tmp_path / "persona" / "persona", "persona")
    assert fresh.generate(CONVERSATIONS, GREEDY, adapter="persona") == adapted
    assert fresh.generate(CONVERSATIONS, GREEDY) == base


def test_adapter_fingerprint_tracks_weights(tiny_lm):
    model, tokenizer = tiny_lm
    backend = HFBackend(_lora(model), tokenizer)
    fingerprint = backend.adapter_fingerprint("persona")
    assert backend.adapter_fingerprint(None) == "base"
    assert backend.adapter_fingerprint("persona") == fingerprint
    with torch.no_grad():
        next(p for n, p in backend.model.named_parameters() if "lora_B" in n).add_(0.01)
    assert backend.adapter_fingerprint("persona") != fingerprint
    with pytest.raises(ValueError, match="unknown adapter"):
        backend.generate(CONVERSATIONS, GREEDY, adapter="missing")


def test_generation_leaves_a_shared_training_model_as_found(tiny_lm):
    from peft import LoraConfig

    model, tokenizer = tiny_lm
    shared = _lora(model)
    shared.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    shared.set_adapter("persona")
    shared.train()
    flags = {name: p.requires_grad for name, p in shared.named_parameters()}
    HFBackend(shared, tokenizer).generate(CONVERSATIONS[:1], GREEDY, adapter="other")
    HFBackend(shared, tokenizer).generate(CONVERSATIONS[:1], GREEDY)
    assert shared.training and shared.active_adapter == "persona"
    assert {name: p.requires_grad for name, p in shared.named_parameters()} == flags


def test_static_engine_only_for_full_attention(tiny_tok):
    from character_baker.testing import tiny_model

    assert supports_static_engine(tiny_model("llama", tiny_tok))
    sliding = tiny_model("qwen2", tiny_tok)
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 16
    assert not supports_static_engine(sliding)
    with pytest.raises(ValueError, match="engine='static'"):
        HFBackend(sliding, tiny_tok, engine="static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_matches_plain_generate_and_is_seeded(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok).cuda()
    graphed, eager = HFBackend(model, tiny_tok), HFBackend(model, tiny_tok, cuda_graphs=False)
    reference = HFBackend(model, tiny_tok, engine="generate")
    assert graphed.generate(CONVERSATIONS, GREEDY, n=2) == reference.generate(CONVERSATIONS, GREEDY, n=2)
    hot = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)
    assert graphed.generate(CONVERSATIONS, hot, n=2) == graphed.generate(CONVERSATIONS, hot, n=2)
    assert graphed.generate(CONVERSATIONS, hot, n=2) == eager.generate(CONVERSATIONS, hot, n=2)


def test_a_shared_prompt_prefix_is_encoded_once_with_the_same_logits(tiny_tok):
    """Rows sharing a long prefix (a system prompt) give the same first-step logits as a plain prefill."""
    import torch

    from character_baker.backends.generation import decoding
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    system = "You are Captain Rook of the Gull's Revenge. " * 12
    prompts = [tiny_tok.apply_chat_template([{"role": "system", "content": system},
                                             {"role": "user", "content": question}], add_generation_prompt=True,
                                            return_dict=False)
               for question in ("Who are you?", "What is the capital of France, matey?")]
    prefix = decoding.shared_prefix_length(prompts)
    assert prefix >= decoding.MIN_SHARED_PREFIX["cuda"]

    def first_logits(shared: int) -> torch.Tensor:
        ids, real = decoding.prefix_then_left_pad(prompts, shared, 0, torch.device("cpu"))
        state = decoding._DecodeState(model, ids, real, 4, shared_prefix=shared)
        with torch.inference_mode():
            state.prefill()
        return state.logits

    torch.testing.assert_close(first_logits(prefix), first_logits(0), rtol=1e-4, atol=1e-5)
    assert decoding.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps a token of its own


@pytest.mark.parametrize("shared", [False, True], ids=["no-prefix", "shared-prefix"])
def test_grouped_prefill_and_trimmed_attention_give_the_same_logits(tiny_tok, shared):
    """CPU decoding: prefill in row groups over their own columns, attention over written columns only."""
    from character_baker.backends.generation import decoding
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    questions = ["Hi", "Who are you?", "Tell me about the sea and the wind.",
                 "Write a poem about the ocean, the wind, the ship and the long night watch."]
    system = [{"role": "system", "content": "You are Captain Rook. " * 4}] if shared else []
    prompts = sorted((tiny_tok.apply_chat_template(system + [{"role": "user", "content": q}],
                                                   add_generation_prompt=True, return_dict=False) for q in questions),
                     key=len)
    prefix = decoding.shared_prefix_length(prompts) if shared else 0
    ids, real = decoding.prefix_then_left_pad(prompts, prefix, 0, torch.device("cpu"))

    def run(groups: int, trim: bool) -> list[torch.Tensor]:
        state = decoding._DecodeState(model, ids, real, 3, shared_prefix=prefix, prefill_groups=groups)
        state.trim = trim
        with torch.inference_mode():
            state.prefill()
            steps = [state.logits.clone()]
            for _ in range(2):
                state.tokens.copy_(steps[-1].argmax(-1, keepdim=True))
                state.step()
                steps.append(state.logits.clone())
        return steps

    plain = run(groups=1, trim=False)
    assert len(decoding.row_groups(real, prefix, 3)) == 3
    for ours, reference in zip(run(groups=3, trim=True), plain):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_adapter_fingerprint_and_saving_never_look_the_model_up_online(tmp_path, tiny_lm, monkeypatch):
    """PEFT's save_embedding_layers='auto' asks the Hub for the base model's config (a network call offline)."""
    import socket
    import warnings

    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.models import attach_lora
    from character_baker.core.config import LoraConfig
    from character_baker.stages.training.checkpoints import save_adapter

    model, tokenizer = tiny_lm
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hub id, as a pulled model has
    peft_model = attach_lora(model, LoraConfig(r=2, alpha=4), seed=0)
    peft_model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: lookups.append(args) or (_ for _ in ()).throw(OSError("offline")))
    with warnings.catch_warnings(record=True) as caught:  # offline (as in tests) PEFT only warns that it would look
        warnings.simplefilter("always")
        HFBackend(peft_model, tokenizer).adapter_fingerprint("default")
        state = {f"model.{k}": v for k, v in peft_model.state_dict().items() if "lora_" in k}
        save_adapter(peft_model, state, tmp_path / "adapter")
    assert lookups == [] and not [w for w in caught if "config file" in str(w.message) or "remote" in str(w.message)]
