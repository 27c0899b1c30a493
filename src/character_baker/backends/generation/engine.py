"""Continuous batching over one loaded causal LM: decoding slots, a waiting queue, per-row everything.

    engine = BatchEngine(model, pad_id=tokenizer.pad_token_id, max_batch=32, max_queue=256)
    engine.start()                                        # a decode thread (or call engine.step() yourself)
    handle = engine.submit(EngineRequest(prompt_ids, max_new_tokens=64, stop_ids=frozenset({2}),
                                         temperature=0.7, top_p=0.95, seed=7, adapter="pirate",
                                         on_token=print))
    handle.wait()                                         # EngineResult: token ids, finish reason
    handle.cancel()                                       # frees the slot at the next step
    engine.generate(requests)                             # submit a list and wait for every result

Features, the argument that controls each, and its cost:

- Slots (`max_batch`): each running request owns one row of a KV cache [rows, kv_heads, capacity,
  head_dim] per layer. Rows are allocated as requests use them (16 at first, doubled up to
  max_batch when a higher slot is taken) and capacity grows in steps of 256 positions as requests
  need it (memory: rows x capacity x layers x 2 x kv_heads x head_dim x dtype bytes), so a large
  max_batch costs memory only under load. Neither shrinks.
- Continuous batching: every step, waiting requests take the free slots (lowest first) and are
  prefilled together, left-padded, in groups of at most `max_prefill_tokens` padded tokens
  (a step admits at most that many prompt tokens, so running streams are never stalled for
  long); their first token comes from the prefill. Then every running row decodes one token in
  one forward over slots [0, highest busy slot], each row writing its keys/values at its own
  position under its own mask. A row that stops (a stop token, max_new_tokens, cancel) frees its
  slot at once: the next waiting request takes it at the next step. After an idle spell the
  engine waits `IDLE_WINDOW_S` for a burst to gather, so it is prefilled as one batch.
- Queue (`max_queue`): at most max_batch running plus max_queue waiting; `submit` beyond that
  raises QueueFull (None = unbounded). Cancelling a waiting request removes it at once.
- Per-row sampling: temperature (0 = greedy), top_p and seed, through `decoding.sample_tokens`.
  Every unseeded row (greedy or sampled) goes through one call with per-row temperature and
  top_p tensors, drawing from the engine's generator (`seed`); a row with a seed has its own torch.Generator and is sampled alone, so a seed gives the same
  answer whatever else is in the batch (up to float rounding of the batched forward). Greedy
  rows are batch-invariant up to float rounding: masked cache positions add exact zeros.
- Per-row adapters (PEFT LoRA): `adapter=None` is the base weights, a name is that adapter. A
  batch of one kind runs plainly (adapter layers disabled for an all-base batch; the active
  adapter as it is); a mixed batch passes PEFT's `adapter_names=` so each row gets its own
  adapter in one forward. The enabled/disabled state is put back when the engine goes idle
  (PEFT's enable/disable also sets requires_grad on adapter weights, as its own
  `disable_adapter()` does).
- Callbacks: `on_start()` when the request takes a slot, `on_token(id)` for every sampled token
  (the stop token included), `on_finish(result)` once. They run on the decode thread (for a
  request cancelled while waiting, on the cancelling thread), so they must be quick: hand work
  to another thread or event loop. The engine-level `on_step()` runs after each step's
  callbacks, to flush a step's hand-offs at once.
- Errors: a failing forward finishes the rows it ran with reason "error" and its message; the
  engine goes on with the next step.

- CUDA graphs (`cuda_graphs`, on CUDA only): a decode step whose rows all use the same adapter
  state is replayed from a graph captured for its row bucket (1, 2, 4, ... max_batch rows;
  engine_graphs.py), reading every cache column under the mask; the first step of each bucket
  pays a capture (one eager forward and a capture), and growing the cache recaptures. A small
  model's eager step is bound by launching its kernels from Python, which the graph removes.
  Mixed-adapter steps and prefills run eagerly; on a CPU every step is eager over the columns
  written so far.

Models: decoder-only with full attention under sdpa or eager (the same models as the static
decode loop), on CPU or CUDA.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Literal, Sequence

import torch

from character_baker.backends.generation.decoding import left_pad, sample_tokens
from character_baker.backends.generation.engine_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
CAPACITY_STEP = 256  # KV-cache positions are added in multiples of this
FIRST_SLOTS = 16  # KV-cache rows allocated at first; doubled as more requests run at once
IDLE_WINDOW_S = 0.002  # after an idle spell, wait this long so a burst of arrivals prefills together
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
RECENT_FINISHES = 256  # finish times kept to estimate the completion rate


class QueueFull(Exception):
    """Raised by `submit` when max_batch requests run and max_queue more already wait."""

    def __init__(self, running: int, waiting: int):
        super().__init__(f"{running} requests decoding and {waiting} waiting: the queue is full")
        self.running, self.waiting = running, waiting


@dataclass(frozen=True)
class EngineRequest:
    """One generation: prompt ids, limits, sampling, adapter, and the callbacks that follow it."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    on_start: Callable[[], None] | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[["EngineResult"], None] | None = None


@dataclass(frozen=True)
class EngineResult:
    """Generated ids (without the stop token), why generation ended, and the error message if it failed."""

    token_ids: list[int]
    finish_reason: FinishReason
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, the stop token included (what OpenAI's usage counts)."""
        return len(self.token_ids) + (self.finish_reason == "stop")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    running: int
    waiting: int
    max_batch: int
    max_queue: int | None
    finished: int
    finishes_per_s: float  # over the last RECENT_FINISHES completions (0 when unknown)


class RequestHandle:
    """A submitted request: cancel it, wait for it, read its result."""

    def __init__(self, request: EngineRequest, engine: "BatchEngine"):
        self.request, self._engine = request, engine
        self.submitted_at = time.monotonic()
        self.cancel_requested = False
        self.result: EngineResult | None = None
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop this request: removed from the queue now, or its slot freed at the next step."""
        self._engine.cancel(self)

    def wait(self, timeout: float | None = None) -> EngineResult | None:
        """The result once finished (None if `timeout` passes first)."""
        self._done.wait(timeout)
        return self.result

    @property
    def done(self) -> bool:
        """Whether the request has finished (any reason)."""
        return self._done.is_set()


class _Row:
    """A running request in its slot: where its cache row starts and ends, what it generated."""

    def __init__(self, handle: RequestHandle, slot: int, device: torch.device):
        self.handle, self.slot = handle, slot
        request = handle.request
        self.adapter, self.temperature, self.top_p = request.adapter, request.temperature, request.top_p
        self.start = 0  # first cache position holding this row's tokens (left padding before it)
        self.position = 0  # the next cache position to write
        self.last_token = 0
        self.generated: list[int] = []
        self.generator = None
        if request.seed is not None and request.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(request.seed % 2**64)


class SlotKVCache:
    """Keys/values for every slot, per layer; duck-types the part of transformers' Cache that layers call.

    Prefill mode writes a group of slots' prompts at positions [0, length) and attends within the
    group; decode mode writes one token per row at each row's own position and returns slots
    [0, rows) up to `span` positions.
    """

    is_compileable = False

    def __init__(self, max_slots: int, capacity: int = CAPACITY_STEP):
        self.max_slots, self.slots, self.capacity = max_slots, min(max_slots, FIRST_SLOTS), capacity
        self.version = 0  # bumped whenever the layers are reallocated (captured graphs hold their addresses)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.prefill_slots: torch.Tensor | None = None
        self.write_positions: torch.Tensor | None = None
        self.row_index: torch.Tensor | None = None
        self.span = 0

    def ensure_capacity(self, positions: int, limit: int | None = None) -> None:
        """Grow every layer to hold at least `positions` positions (rounded up, within `limit`)."""
        if positions <= self.capacity:
            return
        wanted = -(-positions // CAPACITY_STEP) * CAPACITY_STEP
        self.capacity = max(positions, min(wanted, limit) if limit else wanted)
        self._reallocate()

    def ensure_slots(self, rows: int) -> None:
        """Hold at least `rows` slots (doubling, up to max_slots): memory follows the rows in use."""
        if rows <= self.slots:
            return
        if rows > self.max_slots:
            raise ValueError(f"{rows} rows asked of a cache of {self.max_slots} slots")
        slots = self.slots
        while slots < rows:
            slots *= 2
        self.slots = min(self.max_slots, slots)
        self._reallocate()

    def _reallocate(self) -> None:
        self.keys = [self._grown(layer) for layer in self.keys]
        self.values = [self._grown(layer) for layer in self.values]
        self.version += 1

    def _grown(self, layer: torch.Tensor) -> torch.Tensor:
        grown = layer.new_zeros(self.slots, layer.shape[1], self.capacity, layer.shape[-1])
        grown[:layer.shape[0], :, :layer.shape[2]] = layer
        return grown

    def begin_prefill(self, slots: torch.Tensor) -> None:
        """The next forward writes the prompts of `slots` from position 0."""
        self.prefill_slots = slots

    def begin_decode(self, write_positions: torch.Tensor, span: int) -> None:
        """The next forward writes one token for rows [0, len(write_positions)) at their positions."""
        self.prefill_slots, self.write_positions, self.span = None, write_positions, span
        self.row_index = torch.arange(write_positions.shape[0], device=write_positions.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values of one layer and return the ones to attend to."""
        if layer_idx == len(self.keys):
            shape = (self.slots, key_states.shape[1], self.capacity)
            self.keys.append(key_states.new_zeros(*shape, key_states.shape[-1]))
            self.values.append(value_states.new_zeros(*shape, value_states.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_slots is not None:
            length = key_states.shape[2]
            keys[self.prefill_slots, :, :length] = key_states
            values[self.prefill_slots, :, :length] = value_states
            return key_states, value_states
        rows = self.write_positions.shape[0]
        keys[self.row_index, :, self.write_positions] = key_states[:, :, 0]
        values[self.row_index, :, self.write_positions] = value_states[:, :, 0]
        return keys[:rows, :, :self.span], values[:rows, :, :self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused (positions are always explicit); present for transformers' Cache interface."""
        return 0

    def __len__(self) -> int:
        return len(self.keys)


class _AdapterSwitch:
    """Puts a PEFT model in the adapter state one forward needs, changing model-wide state only when it must."""

    def __init__(self, model: Any):
        from character_baker.backends.generation.hf import is_peft_model

        self.model = model
        self.peft = is_peft_model(model)
        self.saved_disabled: bool | None = None  # the state found at the start of a busy spell
        self.disabled = False

    def names(self) -> set[str]:
        """The adapters a request may name."""
        return set(self.model.peft_config) if self.peft else set()

    def forward_arguments(self, adapters: list[str | None]) -> dict[str, Any]:
        """Model state and extra forward arguments for rows using `adapters` (None = base weights)."""
        if not self.peft:
            return {}
        if self.saved_disabled is None:
            self.saved_disabled = self.disabled = bool(getattr(self.model, "_adapters_disabled", False))
        distinct = set(adapters)
        if distinct == {None}:
            self._set_disabled(True)
            return {}
        self._set_disabled(False)
        if distinct == {self.model.active_adapter}:
            return {}
        return {"adapter_names": [adapter or BASE_ADAPTER for adapter in adapters]}

    def state(self) -> Hashable:
        """What a plain (adapter_names-free) forward depends on: adapters off, or which one is active."""
        return (self.disabled, str(self.model.active_adapter)) if self.peft else None

    def _set_disabled(self, disabled: bool) -> None:
        if disabled == self.disabled:
            return
        if disabled:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
        self.model._adapters_disabled = self.disabled = disabled

    def restore(self) -> None:
        """Put back the enabled/disabled state found at the start of the busy spell."""
        if self.saved_disabled is not None:
            self._set_disabled(self.saved_disabled)
            self.saved_disabled = None


def check_engine_support(model: Any) -> None:
    """ValueError unless the model is a decoder with full attention under sdpa or eager."""
    from character_baker.backends.generation.hf import supports_static_engine

    if not supports_static_engine(model):
        implementation = getattr(model.config, "_attn_implementation", None)
        raise ValueError(f"continuous batching needs a decoder with full attention under sdpa or eager; this model "
                         f"uses {implementation!r} attention (or sliding-window layers)")


def _cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class BatchEngine:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model: Any, *, pad_id: int, max_batch: int = 32, max_queue: int | None = None,
                 max_prefill_tokens: int = 4096, seed: int = 0, on_step: Callable[[], None] | None = None,
                 name: str = "engine", cuda_graphs: bool = True):
        check_engine_support(model)
        if max_batch < 1 or max_prefill_tokens < 1 or (max_queue is not None and max_queue < 0):
            raise ValueError("max_batch and max_prefill_tokens must be at least 1 and max_queue at least 0")
        self.model, self.pad_id, self.name = model, pad_id, name
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.on_step = on_step
        embeddings = model.get_input_embeddings().weight
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self.context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._cache = SlotKVCache(max_batch)
        self._inputs = torch.zeros((3, max_batch), dtype=torch.long, device=self.device)  # token, start, write per slot
        self.graphs = DecodeGraphs(max_batch, enabled=cuda_graphs and self.device.type == "cuda")
        self._cache_argument = _cache_argument(model)
        self._adapters = _AdapterSwitch(model)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._slots: list[_Row | None] = [None] * max_batch
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._finish_times: collections.deque[float] = collections.deque(maxlen=RECENT_FINISHES)
        self._finished = 0
        self._thread: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------ requests
    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request (ValueError when malformed, QueueFull when the queue is full)."""
        self._check(request)
        handle = RequestHandle(request, self)
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self.name} is closed")
            running = self._running()
            if self.max_queue is not None and running + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(running, len(self._waiting))
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def _check(self, request: EngineRequest) -> None:
        if not request.prompt_ids or request.max_new_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_new_tokens >= 1")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {request.temperature}, "
                             f"{request.top_p}")
        if request.adapter is not None and request.adapter not in self._adapters.names():
            raise ValueError(f"unknown adapter {request.adapter!r}; loaded: {sorted(self._adapters.names())}")
        needed = len(request.prompt_ids) + request.max_new_tokens
        if self.context_length is not None and needed > self.context_length:
            raise ValueError(f"prompt ({len(request.prompt_ids)}) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceed the model's context of {self.context_length} tokens")

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel a request: a waiting one finishes now, a running one at the next step."""
        with self._lock:
            handle.cancel_requested = True
            if handle not in self._waiting:
                return
            self._waiting.remove(handle)
        self._finish_handle(handle, EngineResult([], "cancelled"))

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """Submit every request and return their results in order (drives the steps when no thread runs)."""
        handles = [self.submit(request) for request in requests]
        while self._thread is None and not all(handle.done for handle in handles):
            self.step()
        return [handle.wait() for handle in handles]  # type: ignore[misc]

    def stats(self) -> EngineStats:
        """Running and waiting counts, limits, and the recent completion rate."""
        with self._lock:
            times = list(self._finish_times)
            rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
            return EngineStats(running=self._running(), waiting=len(self._waiting), max_batch=self.max_batch,
                               max_queue=self.max_queue, finished=self._finished, finishes_per_s=rate)

    def _running(self) -> int:
        return sum(row is not None for row in self._slots)

    # ------------------------------------------------------------------ the decode thread
    def start(self) -> None:
        """Run the steps on a daemon thread until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread; every waiting and running request finishes as cancelled."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            self._finish_handle(handle, EngineResult([], "cancelled"))
        for row in [row for row in self._slots if row is not None]:
            self._finish(row, "cancelled")
        self._adapters.restore()

    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not self._waiting and not self._running()
                while not self._closing and not self._waiting and not self._running():
                    self._lock.wait()
                if self._closing:
                    return
            if idle:
                time.sleep(IDLE_WINDOW_S)
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive; rows involved were finished with the error
                logger.exception("%s: step failed", self.name)

    def step(self) -> None:
        """One iteration: free cancelled rows, prefill newly admitted requests, decode one token per running row."""
        self._reap_cancelled()
        admitted = self._admit()
        for group in self._prefill_groups(admitted):
            self._guarded(group, self._prefill, group)
        self._reap_cancelled()  # again: a callback of the prefill may have cancelled its request
        running = [row for row in self._slots if row is not None]
        if running:
            self._guarded(running, self._decode)
        if self.on_step is not None:
            self.on_step()
        if not running and not admitted:
            self._adapters.restore()

    def _reap_cancelled(self) -> None:
        for row in [row for row in self._slots if row is not None and row.handle.cancel_requested]:
            self._finish(row, "cancelled")

    def _guarded(self, rows: list[_Row], work: Callable[..., None], *args: Any) -> None:
        """Run one forward's work; if it raises, finish its rows with the error."""
        try:
            with torch.inference_mode():
                work(*args)
        except Exception as error:  # noqa: BLE001 - reported per request, never a crash of the engine
            logger.exception("%s: forward failed", self.name)
            message = f"{type(error).__name__}: {error}"
            for row in rows:
                if self._slots[row.slot] is row:
                    self._finish(row, "error", message)

    # ------------------------------------------------------------------ admission and prefill
    def _admit(self) -> list[_Row]:
        """Move waiting requests into free slots, within the step's prefill budget (at least one)."""
        admitted: list[_Row] = []
        with self._lock:
            free = [slot for slot, row in enumerate(self._slots) if row is None]
            budget = self.max_prefill_tokens
            while self._waiting and free:
                cost = len(self._waiting[0].request.prompt_ids)
                if admitted and cost > budget:
                    break
                budget -= cost
                row = _Row(self._waiting.popleft(), free.pop(0), self.device)
                self._slots[row.slot] = row
                admitted.append(row)
        for row in admitted:
            _notify(row.handle, row.handle.request.on_start)
        return admitted

    def _prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows sorted by prompt length, cut so that rows x longest prompt stays within max_prefill_tokens."""
        groups: list[list[_Row]] = []
        for row in sorted(rows, key=lambda row: len(row.handle.request.prompt_ids)):
            length = len(row.handle.request.prompt_ids)
            if groups and (len(groups[-1]) + 1) * length <= self.max_prefill_tokens:
                groups[-1].append(row)
            else:
                groups.append([row])
        return groups

    def _prefill(self, rows: list[_Row]) -> None:
        """Run a group's prompts (left-padded) into their slots and sample each row's first token."""
        prompts = [list(row.handle.request.prompt_ids) for row in rows]
        ids, real = left_pad(prompts, self.pad_id, self.device)
        longest = ids.shape[1]
        self._cache.ensure_capacity(longest + 1, self.context_length)
        positions = (real.long().cumsum(-1) - 1).clamp_(min=0)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril_()
        visible = causal[None] & real[:, None, :]
        mask = self._additive(visible[:, None])
        self._cache.ensure_slots(1 + max(row.slot for row in rows))
        self._cache.begin_prefill(torch.tensor([row.slot for row in rows], device=self.device))
        logits = self._forward(ids, positions, mask, self._adapters.forward_arguments([row.adapter for row in rows]))
        for row, prompt in zip(rows, prompts):
            row.start, row.position = longest - len(prompt), longest
        self._deliver(rows, self._sample(logits, rows))

    # ------------------------------------------------------------------ decoding
    def _decode(self) -> None:
        """One token for every running row, in one forward over slots [0, rows).

        rows = the highest busy slot + 1, rounded up to a graph bucket when decode graphs are on;
        the empty slots among them decode a pad token into their own (unused) row.
        """
        rows = self.graphs.rows_for(1 + max(slot for slot, row in enumerate(self._slots) if row is not None))
        slots = self._slots[:rows]
        active = [row for row in slots if row is not None]
        writes = [row.position if row else 0 for row in slots]
        self._cache.ensure_slots(rows)
        self._cache.ensure_capacity(max(writes) + 1, self.context_length)
        self._inputs[:, :rows].copy_(torch.tensor([[row.last_token if row else self.pad_id for row in slots],
                                                   [row.start if row else 0 for row in slots], writes]))
        hole = active[0].adapter  # empty slots take a running row's adapter, so a uniform batch stays uniform
        extra = self._adapters.forward_arguments([row.adapter if row else hole for row in slots])
        if self.graphs.enabled and not extra:  # fixed shapes: every cache column, under the mask
            capacity = self._cache.capacity
            logits = self.graphs.run((rows, self._adapters.state()), self._cache.version,
                                     lambda: self._decode_forward(rows, capacity, extra))
        else:
            logits = self._decode_forward(rows, max(writes) + 1, extra)
        for row in active:
            row.position += 1
        if len(active) < rows:
            logits = logits[torch.tensor([row.slot for row in active], device=self.device)]
        self._deliver(active, self._sample(logits, active))

    def _decode_forward(self, rows: int, span: int, extra: dict[str, Any]) -> torch.Tensor:
        """Logits of one decode step over slots [0, rows) and cache columns [0, span).

        Graph-safe: the per-step inputs come only from the step-input buffer (`_inputs`), the
        shapes only from the arguments, and nothing is read on the host.
        """
        tokens, start, write = self._inputs[:, :rows]
        columns = torch.arange(span, device=self.device)
        visible = (columns >= start[:, None]) & (columns <= write[:, None])
        self._cache.begin_decode(write, span)
        return self._forward(tokens[:, None], (write - start)[:, None], self._additive(visible[:, None, None]), extra)

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A boolean visibility mask as the additive float mask the attention adds (0 or the dtype's min)."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 extra: dict[str, Any]) -> torch.Tensor:
        """Float32 logits of each row's last position (`extra`: the adapter switch's forward arguments)."""
        output = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                            logits_to_keep=1, **{self._cache_argument: self._cache}, **extra)
        return output.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token per row: every unseeded row (greedy or sampled) in one call with per-row settings, seeded rows alone."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for index, row in enumerate(rows):
            groups[("seeded", index) if row.generator is not None and row.temperature > 0 else ("shared",)].append(index)
        chosen = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for key, indices in groups.items():
            where = torch.tensor(indices, device=self.device)
            selected = logits if len(indices) == len(rows) else logits[where]
            if key[0] == "seeded":
                row = rows[indices[0]]
                picked = sample_tokens(selected, row.temperature, row.top_p, row.generator)
            else:  # one setting for every row (greedy is then one argmax), else per-row tensors (<= 0: greedy)
                settings = {(rows[i].temperature, rows[i].top_p) for i in indices}
                if len(settings) == 1:
                    temperatures, top_ps = settings.pop()
                else:
                    temperatures = torch.tensor([rows[i].temperature for i in indices], device=self.device)
                    top_ps = torch.tensor([rows[i].top_p for i in indices], device=self.device)
                picked = sample_tokens(selected, temperatures, top_ps, self._generator)
            chosen[where] = picked
        return chosen.tolist()

    def _deliver(self, rows: list[_Row], tokens: list[int]) -> None:
        """Hand each row its token; finish the rows that hit a stop token or max_new_tokens."""
        for row, token in zip(rows, tokens):
            request = row.handle.request
            row.generated.append(token)
            row.last_token = token
            _notify(row.handle, request.on_token, token)
            if token in request.stop_ids:
                self._finish(row, "stop")
            elif len(row.generated) >= request.max_new_tokens:
                self._finish(row, "length")

    # ------------------------------------------------------------------ finishing
    def _finish(self, row: _Row, reason: FinishReason, error: str | None = None) -> None:
        """Free the row's slot and report its result."""
        with self._lock:
            self._slots[row.slot] = None
        ids = row.generated[:-1] if reason == "stop" else row.generated
        self._finish_handle(row.handle, EngineResult(list(ids), reason, error))

    def _finish_handle(self, handle: RequestHandle, result: EngineResult) -> None:
        with self._lock:
            self._finished += 1
            self._finish_times.append(time.monotonic())
        handle.result = result
        handle._done.set()
        _notify(handle, handle.request.on_finish, result)


def _notify(handle: RequestHandle, callback: Callable[..., None] | None, *args: Any) -> None:
    """Run one of a request's callbacks; one that raises is logged and cancels its own request only."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - a caller's bug must not stop the other rows
        logger.exception("a request callback failed; cancelling that request")
        handle.cancel_requested = True
