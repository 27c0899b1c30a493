"""The continuous-batching engine on tiny models: batched greedy == solo == `model.generate`, slots
refill while other rows run, cancellation, per-row stops, adapters and seeds, the queue bound."""

from __future__ import annotations

import threading

import pytest
import torch

from character_baker.backends.generation.base import encode_prompt
from character_baker.backends.generation.engine import BatchEngine, EngineRequest, QueueFull


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of varied lengths (so rows are padded differently in every batch)."""
    return [encode_prompt(tokenizer, [{"role": "user", "content": "Ahoy matey, " * (i % 5 + 1) + f"tell me {i}"}])
            for i in range(count)]


def generate_reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy ids from plain `model.generate` on the prompt alone (no stop tokens)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt):].tolist()


def engine_for(model, tokenizer, **options) -> BatchEngine:
    return BatchEngine(model, pad_id=tokenizer.pad_token_id, **options)


def lora_model(tokenizer, names=("pirate", "sarcastic")):
    """A tiny Llama with one LoRA adapter per name, each with non-zero (answer-changing) weights."""
    import peft

    from character_baker.testing import tiny_model

    model = None
    for seed, name in enumerate(names):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        if model is None:
            model = peft.get_peft_model(tiny_model("llama", tokenizer), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.5)
    model.set_adapter(names[0])
    return model.eval()


def test_batched_greedy_equals_solo_and_plain_generate(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = chat_prompts(tokenizer, 9)
    lengths = [6 + i % 4 for i in range(len(prompts))]
    requests = [EngineRequest(prompt, max_new_tokens=n) for prompt, n in zip(prompts, lengths)]
    batched = engine_for(model, tokenizer, max_batch=4).generate(requests)  # 9 requests through 4 slots
    solo = [engine_for(model, tokenizer, max_batch=1).generate([request])[0] for request in requests]
    assert [result.token_ids for result in batched] == [result.token_ids for result in solo]
    assert [result.token_ids for result in batched] == [generate_reference(model, p, n)
                                                        for p, n in zip(prompts, lengths)]
    assert all(result.finish_reason == "length" for result in batched)


def test_a_freed_slot_takes_the_next_request_while_other_rows_keep_decoding(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    events: list[tuple[str, str]] = []

    def request(name: str, prompt: list[int], new_tokens: int) -> EngineRequest:
        return EngineRequest(prompt, max_new_tokens=new_tokens, on_start=lambda: events.append(("start", name)),
                             on_finish=lambda result: events.append(("finish", name)))

    prompts = chat_prompts(tiny_tok, 3)
    results = engine_for(model, tiny_tok, max_batch=2).generate(
        [request("long", prompts[0], 24), request("short", prompts[1], 2), request("waiting", prompts[2], 5)])
    assert events.index(("start", "waiting")) > events.index(("finish", "short"))
    assert events.index(("start", "waiting")) < events.index(("finish", "long"))  # joined the running batch
    assert [len(result.token_ids) for result in results] == [24, 2, 5]
    assert results[2].token_ids == generate_reference(model, prompts[2], 5)
    assert results[0].token_ids == generate_reference(model, prompts[0], 24)


def test_the_cache_grows_past_its_first_capacity_without_disturbing_running_rows(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    short, long = chat_prompts(tiny_tok, 2)
    engine = engine_for(model, tiny_tok, max_batch=2)
    results = engine.generate([EngineRequest(short, max_new_tokens=40), EngineRequest(long, max_new_tokens=300)])
    assert engine._cache.capacity >= len(long) + 300
    assert results[0].token_ids == generate_reference(model, short, 40)
    assert results[1].token_ids == generate_reference(model, long, 300)


def test_per_row_stop_tokens_and_limits(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompt = chat_prompts(tiny_tok, 1)[0]
    free_run = generate_reference(model, prompt, 8)
    stop_at = free_run[3]
    first = free_run.index(stop_at)
    stopped, limited = engine_for(model, tiny_tok, max_batch=2).generate(
        [EngineRequest(prompt, max_new_tokens=8, stop_ids=frozenset({stop_at})), EngineRequest(prompt, max_new_tokens=5)])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free_run[:first]
    assert stopped.completion_tokens == first + 1
    assert limited.finish_reason == "length" and limited.token_ids == free_run[:5]


def test_cancelling_a_running_request_frees_its_slot_and_a_waiting_one_never_starts(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompts = chat_prompts(tiny_tok, 3)
    engine = engine_for(model, tiny_tok, max_batch=1)
    streamed: list[int] = []
    started: list[int] = []
    running = engine.submit(EngineRequest(prompts[0], max_new_tokens=1000, on_token=streamed.append))
    waiting = engine.submit(EngineRequest(prompts[1], max_new_tokens=3, on_start=lambda: started.append(1)))
    after = engine.submit(EngineRequest(prompts[2], max_new_tokens=3))
    engine.step()
    engine.step()
    waiting.cancel()
    assert waiting.done and waiting.result.finish_reason == "cancelled" and engine.stats().waiting == 1
    running.cancel()
    while not after.done:
        engine.step()
    assert running.result.finish_reason == "cancelled" and running.result.token_ids == streamed
    assert len(streamed) == 3 and started == []  # step 1: prefill + one decode; step 2: one decode
    assert after.result.token_ids == generate_reference(model, prompts[2], 3)
    assert engine.stats().running == 0


def test_mixed_adapter_batches_give_each_row_its_own_adapter(tiny_tok):
    model = lora_model(tiny_tok)
    prompts = chat_prompts(tiny_tok, 6)
    adapters = [None, "pirate", "sarcastic"] * 2
    requests = [EngineRequest(prompt, max_new_tokens=8, adapter=adapter) for prompt, adapter in zip(prompts, adapters)]
    mixed = engine_for(model, tiny_tok, max_batch=6).generate(requests)
    alone = [engine_for(model, tiny_tok, max_batch=1).generate([request])[0] for request in requests]
    assert [result.token_ids for result in mixed] == [result.token_ids for result in alone]
    with model.disable_adapter():
        assert mixed[0].token_ids == generate_reference(model, prompts[0], 8)
    model.set_adapter("sarcastic")
    assert mixed[2].token_ids == generate_reference(model, prompts[2], 8)
    model.set_adapter("pirate")
    same_prompt = [EngineRequest(prompts[0], max_new_tokens=8, adapter=adapter) for adapter in (None, "pirate", "sarcastic")]
    assert len({tuple(result.token_ids) for result in engine_for(model, tiny_tok).generate(same_prompt)}) == 3
    assert model.active_adapter == "pirate" and not model._adapters_disabled  # state put back when idle


def test_a_seed_gives_the_same_sample_whatever_else_is_in_the_batch(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompts = chat_prompts(tiny_tok, 6)
    seeded = EngineRequest(prompts[0], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = engine_for(model, tiny_tok).generate([seeded])[0].token_ids
    crowd = [EngineRequest(p, max_new_tokens=12, temperature=0.8, top_p=0.95) for p in prompts[1:]]
    greedy = EngineRequest(prompts[1], max_new_tokens=12)
    together = engine_for(model, tiny_tok).generate([*crowd[:2], seeded, greedy, *crowd[2:]])
    assert together[2].token_ids == alone
    assert together[3].token_ids == generate_reference(model, prompts[1], 12)
    other_seed = EngineRequest(prompts[0], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    assert engine_for(model, tiny_tok).generate([other_seed])[0].token_ids != alone


def test_the_queue_is_bounded_and_requests_are_checked(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompt = chat_prompts(tiny_tok, 1)[0]
    engine = engine_for(model, tiny_tok, max_batch=1, max_queue=1)
    engine.submit(EngineRequest(prompt, max_new_tokens=2))
    engine.submit(EngineRequest(prompt, max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit(EngineRequest(prompt, max_new_tokens=2))
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.submit(EngineRequest(prompt, max_new_tokens=2, adapter="pirate"))
    with pytest.raises(ValueError, match="context"):
        engine.submit(EngineRequest(prompt, max_new_tokens=5000))


def test_the_thread_streams_tokens_in_order_and_close_cancels_the_rest(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompts = chat_prompts(tiny_tok, 4)
    steps = []
    engine = engine_for(model, tiny_tok, max_batch=2, on_step=lambda: steps.append(1))
    engine.start()
    streams: list[list[int]] = [[] for _ in prompts]
    results = engine.generate([EngineRequest(p, max_new_tokens=6, on_token=stream.append)
                               for p, stream in zip(prompts, streams)])
    assert [result.token_ids for result in results] == streams
    assert streams == [generate_reference(model, p, 6) for p in prompts] and steps
    endless = engine.submit(EngineRequest(prompts[0], max_new_tokens=1500))
    engine.close()
    assert endless.wait(timeout=60).finish_reason == "cancelled"


def test_a_failing_forward_finishes_its_rows_with_the_error_and_the_engine_goes_on(tiny_tok, monkeypatch):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompt = chat_prompts(tiny_tok, 1)[0]
    engine = engine_for(model, tiny_tok)
    real_forward = engine._forward
    failures = iter([RuntimeError("out of memory")])

    def flaky(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    failed, = engine.generate([EngineRequest(prompt, max_new_tokens=3)])
    assert failed.finish_reason == "error" and "out of memory" in failed.error
    assert engine.generate([EngineRequest(prompt, max_new_tokens=3)])[0].token_ids == generate_reference(model, prompt, 3)


def test_models_without_full_attention_are_refused(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="full attention"):
        engine_for(model, tiny_tok)


def test_a_callback_that_raises_cancels_only_its_own_request(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompts = chat_prompts(tiny_tok, 2)

    def broken(token_id: int) -> None:
        raise KeyError(token_id)

    lock = threading.Lock()  # the healthy row's callback runs on the same step as the broken one
    seen: list[int] = []

    def healthy(token_id: int) -> None:
        with lock:
            seen.append(token_id)

    bad, good = engine_for(model, tiny_tok).generate([EngineRequest(prompts[0], max_new_tokens=6, on_token=broken),
                                                      EngineRequest(prompts[1], max_new_tokens=6, on_token=healthy)])
    assert bad.finish_reason == "cancelled" and len(bad.token_ids) == 1
    assert good.token_ids == seen == generate_reference(model, prompts[1], 6)


def test_a_request_arriving_mid_decode_gets_its_first_token_at_the_next_step(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    first_prompt, late_prompt = chat_prompts(tiny_tok, 2)
    tokens: dict[str, list[int]] = {"first": [], "late": []}
    engine = engine_for(model, tiny_tok, max_batch=4)
    first = engine.submit(EngineRequest(first_prompt, max_new_tokens=20, on_token=tokens["first"].append))
    for _ in range(3):
        engine.step()
    late = engine.submit(EngineRequest(late_prompt, max_new_tokens=5, on_token=tokens["late"].append))
    assert len(tokens["first"]) == 4  # a step prefills what it admits and then decodes every running row
    engine.step()  # the late request: prefilled (its first token), then decoded in the batch with the first
    assert len(tokens["late"]) == 2 and len(tokens["first"]) == 5 and not first.done
    engine.step()
    assert len(tokens["late"]) == 3 and len(tokens["first"]) == 6
    while not (first.done and late.done):
        engine.step()
    assert first.result.token_ids == generate_reference(model, first_prompt, 20)
    assert late.result.token_ids == generate_reference(model, late_prompt, 5)


def test_kv_cache_rows_are_allocated_as_requests_use_them(tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    prompts = chat_prompts(tiny_tok, 40)
    engine = engine_for(model, tiny_tok, max_batch=256)
    one = engine.generate([EngineRequest(prompts[0], max_new_tokens=3)])
    assert engine._cache.slots == 16 and engine._cache.keys[0].shape[0] == 16  # not 256 rows up front
    many = engine.generate([EngineRequest(prompt, max_new_tokens=3) for prompt in prompts])  # 40 at once
    assert engine._cache.slots == 64 and engine._cache.keys[0].shape[0] == 64
    assert one[0].token_ids == many[0].token_ids
    assert [result.token_ids for result in many] == [generate_reference(model, p, 3) for p in prompts]


def recording_capture(engine: BatchEngine, replays: list):
    """A CPU stand-in for CUDA graph capture: 'replays' re-run the captured closure into its first output,
    and fail if the cache was reallocated since (a real graph would read freed memory)."""
    def capture(forward, pool):
        output, version = forward(), engine._cache.version

        def replay():
            assert engine._cache.version == version, "a graph outlived the cache it was captured on"
            replays.append(output.shape[0])
            output.copy_(forward())
        return replay, output
    return capture


def test_decode_graphs_use_fixed_buckets_and_are_recaptured_when_the_cache_grows(tiny_tok):
    from character_baker.backends.generation.engine_graphs import DecodeGraphs
    from character_baker.testing import tiny_model

    model = lora_model(tiny_tok)
    prompts = chat_prompts(tiny_tok, 5)
    plans = [(prompts[0], 280, "pirate"), (prompts[1], 6, "pirate"), (prompts[2], 9, "pirate"),
             (prompts[3], 4, None), (prompts[4], 7, None)]
    requests = [EngineRequest(p, max_new_tokens=n, adapter=a) for p, n, a in plans]
    eager = engine_for(model, tiny_tok, max_batch=3).generate(requests)
    engine = engine_for(model, tiny_tok, max_batch=3)
    replays: list[int] = []
    engine.graphs = DecodeGraphs(3, enabled=True, capture=recording_capture(engine, replays))
    assert engine.graphs.sizes == [1, 2, 3] and engine.graphs.rows_for(3) == 3 and engine.graphs.rows_for(1) == 1
    graphed = engine.generate(requests)
    assert [result.token_ids for result in graphed] == [result.token_ids for result in eager]
    solo = engine_for(model, tiny_tok, max_batch=1)
    assert graphed[0].token_ids == solo.generate([requests[0]])[0].token_ids
    assert engine._cache.capacity > 256 and engine.graphs.captures >= 3  # recaptured after the cache grew
    assert set(replays) <= {1, 2, 3} and len(replays) > 250  # the uniform steps replayed (mixed ones run eagerly)


def test_decode_graph_buckets():
    from character_baker.backends.generation.engine_graphs import DecodeGraphs, bucket_sizes

    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48] and bucket_sizes(1) == [1]
    graphs = DecodeGraphs(48, enabled=True, capture=lambda forward, pool: None)
    assert [graphs.rows_for(n) for n in (1, 3, 17, 33, 48)] == [1, 4, 32, 48, 48]
    assert DecodeGraphs(48, enabled=False).rows_for(17) == 17


def test_a_decode_graph_is_captured_once_its_key_repeats_and_recaptured_when_the_cache_changes():
    from character_baker.backends.generation.engine_graphs import CAPTURE_AFTER, DecodeGraphs

    captured, replayed = [], []

    def capture(forward, pool):
        captured.append(forward())
        return (lambda: replayed.append(1)), torch.tensor([7.0])

    graphs = DecodeGraphs(8, enabled=True, capture=capture)
    eager = lambda: torch.tensor([1.0])  # noqa: E731
    for key in [(1, None), (2, None), (4, None), (8, None)]:  # a ramp: a new key every step stays eager
        assert graphs.run(key, 0, eager).item() == 1.0
    outputs = [graphs.run((8, None), 0, eager).item() for _ in range(CAPTURE_AFTER + 2)]
    assert captured and graphs.captures == 1 and outputs[-1] == 7.0 and outputs[0] == 1.0
    assert graphs.run((8, None), 1, eager).item() == 7.0 and graphs.captures == 2  # new cache: recaptured
    assert graphs.run((4, None), 1, eager).item() == 1.0  # another key starts its own streak
