"""Generation for the transformers server: served ids -> loaded bases and their batching engines.

    bridge = GenerationBridge.load(target, max_concurrency=32, max_queue=256, max_tokens=1024)
    prepared = bridge.prepare(chat_request)      # ApiError 404/400: unknown model, limits, context
    generation = bridge.start(prepared)          # ApiError 429 + Retry-After when the queue is full
    await generation.wait_started(timeout)       # False (and cancelled) when no slot came free in time
    async for event in generation.events(): ...  # text deltas, then one event with finish_reason
    bridge.health(); bridge.close()

- Weights: each distinct base is loaded once, with every run's persona adapter attached to it under
  a numbered PEFT name; a served id is (base, adapter or None = every adapter off). Never a second
  copy of a base.
- Batching: each base has one continuous-batching engine (backends/generation/engine.py) on its
  own thread: `max_concurrency` rows decode together, any mix of characters and the plain base in
  one forward; a request that finds every row busy waits in the engine's queue (at most
  `max_queue` of them); beyond that, 429 with a Retry-After estimated from the recent completion
  rate. A request waits at most the caller's timeout for its row (app.py answers 503 after it).
- Streaming: the engine calls back per token on its thread; text is decoded incrementally (a
  partial UTF-8 character waits for its next byte) and handed to the event loop through one
  LoopRelay, one wake-up of the loop per engine step for all of that step's tokens. Text deltas
  waiting in a generation's queue are joined into one when the reader comes for them.
- Cancellation: leaving `events()` early (a client that disconnects) cancels the request, whose
  row is freed at the engine's next step; a waiting request leaves the queue at once.
- `max_tokens` above the server's limit, or beyond the model's context, is a 400; when a request
  omits it, the answer may use the limit (or what is left of the context).
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from character_baker.backends.generation.base import encode_prompt
from character_baker.backends.generation.engine import BatchEngine, EngineRequest, EngineResult, QueueFull
from character_baker.backends.generation.hf import is_peft_model, stop_token_ids
from character_baker.core.config import ModelsConfig
from character_baker.core.errors import UserError
from character_baker.stages.serving.schemas import ApiError, ChatRequest
from character_baker.stages.serving.target import ServeTarget, reference_id

MAX_RETRY_AFTER_S = 60


@dataclass
class LoadedWeights:
    """One loaded model (maybe a PEFT model holding adapters), its tokenizer, and the engine decoding it."""

    model: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    context_length: int | None
    engine: BatchEngine


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, tokenised and bounded, ready to generate."""

    model_id: str
    weights: str
    adapter: str | None
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class GenerationEvent:
    """New text; the last event also carries finish_reason and the completion's token count (or an error)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class IncrementalDecoder:
    """Generated token ids -> text deltas, decoding a window of a few ids per token, never the whole answer.

    Each push decodes the ids from `prefix` on twice, with and without the ones not yet emitted
    (from `read` on); the new text is the difference. The emitted ids before them give the
    context a tokenizer needs (a leading-space rule, a character split over several ids); a partial
    UTF-8 character (the text ends in U+FFFD) waits for its next byte. (The offsets scheme of
    text-generation-inference and vLLM.)
    """

    def __init__(self, tokenizer: Any, stop_ids: tuple[int, ...]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []  # generated ids, stop tokens left out
        self.prefix = 0  # where the decoding window starts
        self.read = 0  # ids before this one have been emitted
        self.token_count = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is partial)."""
        self.token_count += 1
        if token_id in self.stop_ids:
            self.stopped = True
            return self.flush()
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


def _load_weights(weights: str, adapters: dict[str, Any], models_config: ModelsConfig) -> tuple[Any, Any]:
    """Load one model reference and attach each adapter under its name: (model, tokenizer)."""
    from peft import PeftModel

    from character_baker.backends.models import load_model

    model, tokenizer = load_model(weights, models_config)
    for name, path in adapters.items():
        try:
            if is_peft_model(model):
                model.load_adapter(str(path), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        except Exception as error:  # noqa: BLE001 - PEFT raises many kinds; the user gets one message
            raise UserError.single(str(path), "adapter", f"could not load this LoRA adapter onto {weights} "
                                   f"({type(error).__name__}: {error})",
                                   "check it is a PEFT adapter folder trained on that base model") from None
    return model.eval(), tokenizer


class LoopRelay:
    """Hands callbacks from decode threads to event loops: everything posted since the last flush, in one wake-up."""

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.AbstractEventLoop, Callable[..., None], tuple]] = []
        self._lock = threading.Lock()

    def post(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        """Queue `callback(*args)` to run on `loop` at the next flush."""
        with self._lock:
            self._pending.append((loop, callback, args))

    def flush(self) -> None:
        """Schedule everything posted so far, in order, one call_soon_threadsafe per loop."""
        with self._lock:
            pending, self._pending = self._pending, []
            by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
            for loop, callback, args in pending:
                by_loop[loop].append((callback, args))
            for loop, calls in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_run_calls, calls)
                except RuntimeError:  # that loop has closed (server shutting down): nobody is listening
                    pass


def _run_calls(calls: list[tuple[Callable[..., None], tuple]]) -> None:
    for callback, args in calls:
        callback(*args)


def _served_names(target: ServeTarget) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str | None]]]:
    """(weights -> {adapter name: adapter folder}, model id -> (weights, adapter name or None))."""
    adapters: dict[str, dict[str, Any]] = {}
    served: dict[str, tuple[str, str | None]] = {}
    for number, model in enumerate(target.models):
        adapters.setdefault(model.weights, {})
        # PEFT adapter names become module keys (no '.' or '/'), so they are numbered, not the ids.
        adapter_name = f"served_{number}" if model.adapter is not None else None
        if adapter_name is not None:
            adapters[model.weights][adapter_name] = model.adapter
        served[model.id] = (model.weights, adapter_name)
    return adapters, served


class GenerationBridge:
    """Served model ids -> loaded bases and engines; admission, limits and streaming generation."""

    def __init__(self, weights: dict[str, LoadedWeights], served: dict[str, tuple[str, str | None]], *,
                 max_tokens: int, relay: LoopRelay):
        self.weights = weights
        self.served = served  # model id -> (weights reference, adapter name or None)
        self.max_tokens = max_tokens
        self.relay = relay

    @classmethod
    def load(cls, target: ServeTarget, *, max_concurrency: int, max_queue: int, max_tokens: int) -> "GenerationBridge":
        """Load every distinct base of `target` once with its adapters, and start one engine per base."""
        adapters, served = _served_names(target)
        relay = LoopRelay()
        weights = {}
        for reference, named in adapters.items():
            model, tokenizer = _load_weights(reference, named, target.models_config)
            weights[reference] = _with_engine(reference, model, tokenizer, relay, max_concurrency, max_queue)
        return cls(weights, served, max_tokens=max_tokens, relay=relay)

    def model_ids(self) -> list[str]:
        """The ids clients may name, characters first."""
        return list(self.served)

    def health(self) -> dict[str, Any]:
        """Loaded models with their queue depth and running rows, per base and in total."""
        bases = []
        for reference, loaded in self.weights.items():
            stats = loaded.engine.stats()
            bases.append({"base": reference_id(reference),
                          "models": [model for model, (ref, _) in self.served.items() if ref == reference],
                          "running": stats.running, "waiting": stats.waiting, "max_concurrency": stats.max_batch,
                          "max_queue": stats.max_queue})
        return {"status": "ok", "models": self.model_ids(),
                "queue": {"running": sum(base["running"] for base in bases),
                          "waiting": sum(base["waiting"] for base in bases)},
                "bases": bases}

    def prepare(self, request: ChatRequest) -> PreparedChat:
        """Check the model id and token limits, and tokenise; ApiError 404/400 otherwise."""
        if request.model not in self.served:
            raise ApiError(404, f"The model '{request.model[:100]}' does not exist; this server serves: "
                           f"{', '.join(self.served)}", code="model_not_found", param="model")
        reference, adapter = self.served[request.model]
        loaded = self.weights[reference]
        requested = request.requested_max_tokens()
        if requested is not None and requested > self.max_tokens:
            raise ApiError(400, f"max_tokens {requested} is above this server's limit of {self.max_tokens} "
                           "(raise it with `serve --max-tokens`)", code="max_tokens_too_large", param="max_tokens")
        try:
            prompt_ids = encode_prompt(loaded.tokenizer, request.conversation())
        except Exception as error:  # noqa: BLE001 - chat templates raise their own errors
            raise ApiError(400, f"the model's chat template rejected these messages: {error}",
                           code="invalid_messages", param="messages") from None
        return PreparedChat(model_id=request.model, weights=reference, adapter=adapter, prompt_ids=prompt_ids,
                            max_new_tokens=self._room(loaded, len(prompt_ids), requested),
                            temperature=request.temperature, top_p=request.top_p, seed=request.seed)

    def _room(self, loaded: LoadedWeights, prompt_tokens: int, requested: int | None) -> int:
        """Tokens the answer may use: the request's max_tokens, else the limit, within the context."""
        wanted = requested if requested is not None else self.max_tokens
        if loaded.context_length is None:
            return wanted
        room = loaded.context_length - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and max_tokens {wanted}, beyond the model's "
                           f"context of {loaded.context_length} tokens: shorten the conversation or max_tokens",
                           code="context_length_exceeded", param="messages")
        return min(wanted, room)

    def start(self, prepared: PreparedChat, *, stream: bool = True) -> "Generation":
        """Queue the request on its base's engine (ApiError 429 with Retry-After when the queue is full).

        `stream=False` hands the text over once, at the end, instead of per token.
        """
        loaded = self.weights[prepared.weights]
        try:
            return Generation(loaded, prepared, self.relay, stream=stream)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy: {full.running} requests decoding and {full.waiting} waiting "
                           "for this model, the most it queues (serve --max-concurrency, --max-queue); retry later",
                           code="queue_full", headers={"Retry-After": str(retry_after_s(loaded.engine))}) from None

    def close(self) -> None:
        """Stop every engine; requests still queued or running finish as cancelled."""
        for loaded in self.weights.values():
            loaded.engine.close()
        self.relay.flush()


def _with_engine(reference: str, model: Any, tokenizer: Any, relay: LoopRelay, max_concurrency: int,
                 max_queue: int) -> LoadedWeights:
    """The loaded weights with a started engine (UserError for a model the engine cannot batch)."""
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    try:
        engine = BatchEngine(model, pad_id=pad_id, max_batch=max_concurrency, max_queue=max_queue,
                             on_step=relay.flush, name=f"decode-{reference_id(reference)}")
    except ValueError as error:
        raise UserError.single(reference, "models.attn_implementation", f"the transformers server cannot batch this "
                               f"model: {error}", "set models.attn_implementation to 'sdpa' in the run's recipe, "
                               "or serve it with --engine vllm") from None
    engine.start()
    return LoadedWeights(model=model, tokenizer=tokenizer, stop_ids=stop_ids, context_length=engine.context_length,
                         engine=engine)


def retry_after_s(engine: BatchEngine) -> int:
    """Seconds until a queued request would likely get a row: queue depth / recent completion rate (1..60)."""
    stats = engine.stats()
    if stats.finishes_per_s <= 0:
        return 1
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil((stats.waiting + 1) / stats.finishes_per_s)))


class Generation:
    """One request in an engine, seen from the event loop: started, then text events, then the final event."""

    def __init__(self, loaded: LoadedWeights, prepared: PreparedChat, relay: LoopRelay, *, stream: bool = True):
        self.prepared, self.relay, self.stream = prepared, relay, stream
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.started = asyncio.Event()
        self.finished = False
        self.decoder = IncrementalDecoder(loaded.tokenizer, loaded.stop_ids)
        self.held: list[str] = []  # text of a request that does not stream, handed over at the end
        self.handle = loaded.engine.submit(EngineRequest(
            prompt_ids=prepared.prompt_ids, max_new_tokens=prepared.max_new_tokens,
            stop_ids=frozenset(loaded.stop_ids), temperature=prepared.temperature, top_p=prepared.top_p,
            seed=prepared.seed, adapter=prepared.adapter, on_start=self._on_start, on_token=self._on_token,
            on_finish=self._on_finish))

    # decode-thread side
    def _on_start(self) -> None:
        self.relay.post(self.loop, self.started.set)

    def _on_token(self, token_id: int) -> None:
        text = self.decoder.push(token_id)
        if text and self.stream:
            self.relay.post(self.loop, self.queue.put_nowait, GenerationEvent(text=text))
        elif text:
            self.held.append(text)

    def _on_finish(self, result: EngineResult) -> None:
        tail = "".join(self.held) + self.decoder.flush()
        if tail:
            self.relay.post(self.loop, self.queue.put_nowait, GenerationEvent(text=tail))
        if result.finish_reason == "error":
            final = GenerationEvent(error=f"generation failed: {result.error}")
        else:
            final = GenerationEvent(finish_reason="stop" if result.finish_reason == "stop" else "length",
                                    completion_tokens=result.completion_tokens)
        self.relay.post(self.loop, self.queue.put_nowait, final)
        self.relay.post(self.loop, self.started.set)  # a request that ends unstarted wakes its waiter too

    # event-loop side
    async def wait_started(self, timeout: float) -> bool:
        """Wait until the request has a row (or has ended); False, with the request cancelled, after `timeout`."""
        try:
            await asyncio.wait_for(self.started.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            self.cancel()
            return False

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Text deltas as they are decoded (queued ones joined), then the final event; leaving early cancels."""
        try:
            while True:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                text = "".join(event.text for event in batch)
                final = next((event for event in batch if event.finish_reason or event.error), None)
                if text:
                    yield GenerationEvent(text=text)
                if final is not None:
                    self.finished = True
                    yield final
                    return
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        """Cancel the request (it leaves the queue now, or its row is freed at the next step)."""
        self.handle.cancel()
        self.relay.flush()
