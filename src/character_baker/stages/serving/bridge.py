"""Generation for the transformers server: served ids -> loaded weights, limits, token streaming.

    bridge = GenerationBridge.load(target, max_concurrency=4, max_tokens=1024)
    prepared = bridge.prepare(chat_request)        # ApiError 404/400: unknown model, limits, context
    generation = bridge.start(prepared)            # ApiError 429 when every slot is busy
    async for event in generation.events(): ...    # text deltas, then one event with finish_reason

- Weights are loaded once per distinct reference; a served id with an adapter is that adapter
  switched on, an id without one runs with every adapter disabled (never a second copy).
- One generation runs on a set of weights at a time (a lock: adapters are switched per request,
  which is model-wide state); `max_concurrency` slots bound the generations admitted (running or
  waiting for the lock); a request beyond that gets 429 with Retry-After. Batching concurrent
  requests is what the vLLM engine is for.
- Streaming: `model.generate` runs in a worker thread with a streamer that pushes each new token
  onto the event loop; text is decoded incrementally, holding back a partial UTF-8 character.
  A client that disconnects cancels its generation at the next token (a stopping criterion).
- `max_tokens` above the server's limit, or beyond the model's context, is a 400; when a request
  omits it, the answer may use the limit (or what is left of the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from character_baker.backends.generation.base import encode_prompt
from character_baker.backends.generation.hf import adapter_enabled, is_peft_model, stop_token_ids
from character_baker.core.config import ModelsConfig
from character_baker.core.errors import UserError
from character_baker.stages.serving.schemas import ApiError, ChatRequest
from character_baker.stages.serving.target import ServeTarget


@dataclass
class LoadedWeights:
    """One loaded model (maybe a PEFT model holding adapters), its tokenizer and its lock."""

    model: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    context_length: int | None
    lock: threading.Lock


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
    """Generated token ids -> text deltas; a partial UTF-8 character waits for its next byte."""

    def __init__(self, tokenizer: Any, stop_ids: tuple[int, ...]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.pending: list[int] = []  # ids since the last line break (decoding restarts there)
        self.emitted = 0  # characters of decode(pending) already returned
        self.token_count = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is partial)."""
        self.token_count += 1
        if token_id in self.stop_ids:
            self.stopped = True
            return self.flush()
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self.emitted:]
        self.pending, self.emitted = ([], 0) if text.endswith("\n") else (self.pending, len(text))
        return delta

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        delta = self.tokenizer.decode(self.pending, skip_special_tokens=True)[self.emitted:]
        self.pending, self.emitted = [], 0
        return delta


def _load_weights(weights: str, adapters: dict[str, Any], models_config: ModelsConfig) -> LoadedWeights:
    """Load one model reference and attach each adapter under its name."""
    from peft import PeftModel

    from character_baker.backends.models import load_model

    model, tokenizer = load_model(weights, models_config)
    context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    stop_ids = stop_token_ids(tokenizer, model)
    for name, path in adapters.items():
        try:
            if is_peft_model(model):
                model.load_adapter(str(path), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()
        except Exception as error:  # noqa: BLE001 - PEFT raises many kinds; the user gets one message
            raise UserError.single(str(path), "adapter", f"could not load this LoRA adapter onto {weights} "
                                   f"({type(error).__name__}: {error})",
                                   "check it is a PEFT adapter folder trained on that base model") from None
    return LoadedWeights(model=model, tokenizer=tokenizer, stop_ids=stop_ids, context_length=context_length,
                         lock=threading.Lock())


class GenerationBridge:
    """Served model ids -> loaded weights; admission, limits and streaming generation."""

    def __init__(self, weights: dict[str, LoadedWeights], served: dict[str, tuple[str, str | None]], *,
                 max_concurrency: int, max_tokens: int):
        self.weights = weights
        self.served = served  # model id -> (weights reference, adapter name or None)
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.slots = threading.BoundedSemaphore(max_concurrency)

    @classmethod
    def load(cls, target: ServeTarget, *, max_concurrency: int, max_tokens: int) -> "GenerationBridge":
        """Load every distinct set of weights of `target` once, with its adapters."""
        adapters: dict[str, dict[str, Any]] = {}
        served: dict[str, tuple[str, str | None]] = {}
        for number, model in enumerate(target.models):
            adapters.setdefault(model.weights, {})
            # PEFT adapter names become module keys (no '.' or '/'), so they are numbered, not the ids.
            adapter_name = f"served_{number}" if model.adapter is not None else None
            if adapter_name is not None:
                adapters[model.weights][adapter_name] = model.adapter
            served[model.id] = (model.weights, adapter_name)
        weights = {ref: _load_weights(ref, named, target.models_config) for ref, named in adapters.items()}
        return cls(weights, served, max_concurrency=max_concurrency, max_tokens=max_tokens)

    def model_ids(self) -> list[str]:
        """The ids clients may name, character first."""
        return list(self.served)

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

    def start(self, prepared: PreparedChat) -> "Generation":
        """Admit the request (ApiError 429 when every slot is busy) and start generating."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(429, f"all {self.max_concurrency} generation slots are busy (serve --max-concurrency); "
                           "retry shortly", code="too_many_requests", headers={"Retry-After": "1"})
        try:
            return Generation(self.weights[prepared.weights], prepared, release=self.slots.release)
        except BaseException:
            self.slots.release()
            raise


class Generation:
    """One running generation: a worker thread feeding events to the event loop."""

    def __init__(self, loaded: LoadedWeights, prepared: PreparedChat, release: Callable[[], None]):
        self.loaded, self.prepared, self.release = loaded, prepared, release
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationEvent | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        threading.Thread(target=self._run, name=f"generate-{prepared.model_id}", daemon=True).start()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Text deltas as they are decoded, then the final event; leaving early cancels the generation."""
        try:
            while (event := await self.queue.get()) is not None:
                yield event
        finally:
            self.cancelled.set()

    def _emit(self, event: GenerationEvent | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            self.cancelled.set()

    def _run(self) -> None:
        try:
            with self.loaded.lock:
                if not self.cancelled.is_set():
                    self._generate()
        except Exception as error:  # noqa: BLE001 - reported to the client, never a traceback
            self._emit(GenerationEvent(error=f"generation failed: {type(error).__name__}: {error}"))
        finally:
            self.release()
            self._emit(None)

    def _generate(self) -> None:
        """Run model.generate with a token streamer; emit deltas and the final event."""
        import torch

        model, prepared = self.loaded.model, self.prepared
        decoder = IncrementalDecoder(self.loaded.tokenizer, self.loaded.stop_ids)
        device = model.get_input_embeddings().weight.device
        input_ids = torch.tensor([prepared.prompt_ids], dtype=torch.long, device=device)
        streamer = _TokenStreamer(lambda token_id: self._emit_text(decoder.push(token_id)))
        with adapter_enabled(model, prepared.adapter), torch.inference_mode(), _seeded(prepared.seed, device):
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                           stopping_criteria=_cancel_criteria(self.cancelled), **self._sampling_options())
        self._emit_text(decoder.flush())
        self._emit(GenerationEvent(finish_reason="stop" if decoder.stopped else "length",
                                   completion_tokens=decoder.token_count))

    def _emit_text(self, text: str) -> None:
        if text:
            self._emit(GenerationEvent(text=text))

    def _sampling_options(self) -> dict[str, Any]:
        prepared, tokenizer = self.prepared, self.loaded.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.loaded.stop_ids[0]
        options: dict[str, Any] = dict(max_new_tokens=prepared.max_new_tokens, eos_token_id=list(self.loaded.stop_ids),
                                       pad_token_id=pad_id, do_sample=prepared.temperature > 0)
        if prepared.temperature > 0:
            options.update(temperature=prepared.temperature, top_p=prepared.top_p, top_k=0)
        return options


class _TokenStreamer:
    """A `generate` streamer: skips the prompt, hands each new token id to `on_token`."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by generate with the prompt first, then with each step's new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.on_token(int(token_id))

    def end(self) -> None:
        """Called by generate when it finishes."""


def _cancel_criteria(cancelled: threading.Event) -> Any:
    """A stopping criterion that ends generation once `cancelled` is set (client gone)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


@contextlib.contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Sample from a generator seeded with `seed` (None = unseeded), restoring the global RNG after."""
    import torch

    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
