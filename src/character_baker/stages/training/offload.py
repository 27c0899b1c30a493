"""Training state moved off the GPU: optimizer (ZeRO-Offload), saved activations, input embeddings.

Each is a recipe switch of a training section; each keeps the math of the run without it.

- `offload_optimizer` (ZeRO-Offload, Ren et al. 2021): the float32 master LoRA weights, their
  gradients and the AdamW moments live in CPU memory; the GPU keeps only a copy of the LoRA
  weights in the compute dtype (bf16), which is what autocast would cast them to anyway. Each
  gradient is copied to pinned CPU memory on a side stream the moment backward finishes it
  (and its GPU memory released), accumulated in float32 on the CPU, clipped there, and the
  CPU's fused AdamW updates the masters; the updated weights go back as bf16. GPU memory saved
  for 8B-scale LoRA r64 (168 M parameters): float32 weights + gradients + two moments, 2.5 GiB,
  less the 0.31 GiB bf16 copy. Cost: the CPU step at the end of each optimiser step.
- `offload_activations` (with gradient checkpointing): the tensors autograd saves outside the
  checkpointed layers (each layer's input, about `tokens x hidden x 2` bytes per layer) are
  copied to pinned CPU memory on a side stream during forward and brought back in backward, one
  layer ahead of use, so the copies overlap compute. Checkpointing runs in its reentrant form
  here, because that form saves each layer's input through autograd, where the offload hooks
  can see it. Tensors under 1 MiB and parameters stay where they are.
- `offload_embeddings`: the frozen input embedding table (vocab x hidden, 1 GiB for Llama-3 8B)
  stays in CPU memory; the lookup runs there and only the looked-up rows go to the GPU.

On a CPU-only run the same code paths run with plain copies (the tests use this).
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MIN_OFFLOAD_BYTES = 1 << 20
#: optimizer settings carried from the scheduled (lead) optimizer to the per-bucket ones
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "initial_lr")
SWITCH_INTERVAL = 0.0005  # seconds; see OffloadedAdamW.__init__


def _pinned(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


class OffloadedAdamW:
    """AdamW over float32 master weights in CPU memory, stepped by a CPU thread while the GPU runs on.

    The GPU parameters become compute-dtype copies. Per optimiser step:

    1. backward: each finished gradient is copied to pinned memory (side stream) and its GPU
       memory released; the worker thread accumulates it in float32 and adds its squared norm;
    2. `step(max_norm)`: once the last gradient is in, the worker has the global norm (returned;
       gradients are clipped by it exactly as `clip_grad_norm_` does), then runs the fused CPU
       AdamW bucket by bucket in forward order (one bucket per decoder layer) and uploads each
       bucket's weights (second stream) as soon as it is done;
    3. the next forward waits, layer by layer, only for its own bucket: the CPU step of layer k
       overlaps the GPU forward of the layers before it, and the math is that of a plain step.

    With gradient accumulation call `micro_step(last)` before each backward and `collect()` after
    each one but the last. `lead` is the optimizer schedulers attach to (its learning rate is read
    at each step; it is never stepped itself); `state_dicts()` / `load_state_dicts()` use the names.
    """

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
                 compute_dtype: torch.dtype, decoder: nn.Module | None = None,
                 layers: Sequence[nn.Module] = ()):
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.device = self.params[0].device
        cuda = self.device.type == "cuda"
        self.masters = [param.detach().to("cpu", torch.float32, copy=True) for param in self.params]
        if cuda:
            self.masters = [master.pin_memory() for master in self.masters]
        for master in self.masters:  # pinned: the copies from the GPU must not block the host
            master.grad = torch.zeros_like(master).pin_memory() if cuda else torch.zeros_like(master)
        # float32 staging for gradients of the second and later backward of an accumulated step
        # (allocated on first use: a step of one backward writes straight into the masters' gradients)
        self._down: list[torch.Tensor | None] = [None] * len(self.params)
        # squared gradient norms, computed on the GPU when a step has one backward
        self._squares_gpu = torch.zeros(len(self.params), device=self.device) if cuda else None
        self._squares_host = _pinned(torch.Size([len(self.params)]), torch.float32, self.device)
        self._index = {id(param): index for index, param in enumerate(self.params)}
        self._hooks = []
        for param in self.params:
            param.data = param.data.to(compute_dtype)
            self._hooks.append(param.register_post_accumulate_grad_hook(self._gradient_ready))
        # Buckets in forward order: parameters outside the decoder layers first, then layer by layer.
        layer_of = {id(p): k + 1 for k, layer in enumerate(layers) for p in layer.parameters()}
        bucket_ids = sorted({layer_of.get(id(p), 0) for p in self.params})
        position = {bucket: order for order, bucket in enumerate(bucket_ids)}
        self._buckets = [[] for _ in bucket_ids]
        for index, param in enumerate(self.params):
            self._buckets[position[layer_of.get(id(param), 0)]].append(index)
        self.lead = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)
        self._optimizers = [torch.optim.AdamW([self.masters[i] for i in bucket], lr=lr, weight_decay=weight_decay,
                                              fused=True) for bucket in self._buckets]
        self._ready = [threading.Event() for _ in self._buckets]
        for ready in self._ready:
            ready.set()
        self._uploaded: list[Any] = [None] * len(self._buckets)
        if decoder is not None:  # parameters outside the layers (bucket 0) before the decoder starts
            self._hooks.append(decoder.register_forward_pre_hook(self._waiter(0)))
        for k, layer in enumerate(layers):
            if k + 1 in position:
                self._hooks.append(layer.register_forward_pre_hook(self._waiter(position[k + 1])))
        self._down_stream = torch.cuda.Stream(self.device) if cuda else None
        self._up_stream = torch.cuda.Stream(self.device) if cuda else None
        self._fresh = [True] * len(self.params)   # the next gradient overwrites instead of adding
        self._squares = [None] * len(self.params)  # squared norms of final gradients
        self._squared_on_gpu: set[int] = set()     # ... of these, still in `_squares_gpu`
        self._final, self._first, self._micro = True, True, 0
        self._norm, self._error = 0.0, None
        self._norm_ready, self._synced = threading.Event(), threading.Event()
        self._jobs: queue.Queue = queue.Queue()
        # The CPU thread needs the GIL between its kernels while the training thread launches the
        # forward: a shorter switch interval than Python's 5 ms lets it keep ahead (restored by close()).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL))
        self._worker = threading.Thread(target=self._work, name="offloaded-adamw", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- main thread
    def _gradient_ready(self, param: nn.Parameter) -> None:
        index, grad = self._index[id(param)], param.grad
        # The first backward of a step writes the master's gradient directly; later ones are added.
        if not self._first and self._down[index] is None:
            self._down[index] = _pinned(param.shape, torch.float32, self.device)
        target = self.masters[index].grad if self._first else self._down[index]
        single = self._first and self._final
        event = None
        if self._down_stream is None:
            target.copy_(grad)
        else:  # float32 on the GPU (no conversion work for the CPU), then one copy to pinned memory
            self._down_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._down_stream):
                wide = grad.float()
                if single:
                    self._squares_gpu[index] = wide.square().sum()
                target.copy_(wide, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            grad.record_stream(self._down_stream)  # its memory is reused only after the copy
        param.grad = None
        self._jobs.put(("grad", index, event, self._final, self._first, single and self._squares_gpu is not None))

    def _waiter(self, bucket: int) -> Any:
        @torch.compiler.disable
        def wait(_module: nn.Module, _args: Any) -> None:
            self._ready[bucket].wait()
            self._raise()
            if self._uploaded[bucket] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._uploaded[bucket])
        return wait

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError("the offloaded optimizer's CPU thread failed") from self._error

    def micro_step(self, last: bool) -> None:
        """Announce the next backward (the last of this optimiser step or not)."""
        self._first, self._final = self._micro == 0, last
        self._micro += 1

    def collect(self) -> None:
        """Wait until the worker has taken in this backward's gradients (between accumulated backwards)."""
        self._synced.clear()
        self._jobs.put(("sync",))
        self._synced.wait()
        self._raise()

    def step(self, max_grad_norm: float) -> float:
        """Start the CPU step (clip at `max_grad_norm`, AdamW, upload); return the gradient norm before clipping."""
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        hyper = {key: value for key, value in self.lead.param_groups[0].items() if key in HYPERPARAMETERS}
        for ready in self._ready:
            ready.clear()
        self._norm_ready.clear()
        self._micro, self._first, self._final = 0, True, True
        self._jobs.put(("step", hyper, max_grad_norm, done))
        self.lead._opt_called = True  # the bucket optimizers step for it (else schedulers warn about the order)
        self._norm_ready.wait()
        self._raise()
        return self._norm

    def synchronize(self) -> None:
        """Wait until the last step's weights are updated on the CPU and uploaded."""
        for ready in self._ready:
            ready.wait()
        self._raise()
        if self._up_stream is not None:
            self._up_stream.synchronize()

    def close(self) -> None:
        """Finish pending work, stop the worker thread, remove the hooks and let go of every tensor."""
        self.synchronize()
        self._jobs.put(None)
        self._worker.join()
        sys.setswitchinterval(self._switch_interval)
        for hook in self._hooks:
            hook.remove()
        # The parameters' hooks referenced this object: drop the tensors explicitly (GPU copies included).
        self._hooks, self.params, self.masters, self._down, self._optimizers = [], [], [], [], []
        self._squares_gpu = None

    # ----------------------------------------------------------- worker thread
    def _work(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # Half the cores for AdamW: the training thread and autograd's thread keep theirs (with
            # every core, OpenMP's workers stall behind them; measured 180 ms instead of ~40 per step).
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        while (job := self._jobs.get()) is not None:
            try:
                if job[0] == "grad":
                    self._take_gradient(*job[1:])
                elif job[0] == "sync":
                    self._synced.set()
                else:
                    self._step(*job[1:])
            except BaseException as error:  # surfaced in the main thread; never leave it waiting
                self._error = error
                for event in (*self._ready, self._norm_ready, self._synced):
                    event.set()

    def _take_gradient(self, index: int, event: Any, final: bool, first: bool, squared_on_gpu: bool) -> None:
        if event is not None:
            event.synchronize()
        if not first:  # (a parameter without a gradient in the first backward starts from this one)
            grad = self.masters[index].grad
            grad.copy_(self._down[index]) if self._fresh[index] else grad.add_(self._down[index])
        self._fresh[index] = False
        if final and squared_on_gpu:
            self._squared_on_gpu.add(index)
        elif final:
            self._squares[index] = float(torch.linalg.vector_norm(self.masters[index].grad)) ** 2

    def _step(self, hyper: dict, max_grad_norm: float, backward_done: Any) -> None:
        if self._squared_on_gpu:
            with torch.cuda.stream(self._down_stream):
                self._squares_host.copy_(self._squares_gpu, non_blocking=True)
            self._down_stream.synchronize()
            squares = self._squares_host.tolist()
            for index in self._squared_on_gpu:
                self._squares[index] = squares[index]
        for index, fresh in enumerate(self._fresh):
            if fresh:  # no gradient reached this parameter in this step
                self.masters[index].grad.zero_()
            if self._squares[index] is None:
                self._squares[index] = float(torch.linalg.vector_norm(self.masters[index].grad)) ** 2
        self._norm = math.sqrt(sum(self._squares))
        self._norm_ready.set()
        scale = max_grad_norm / (self._norm + 1e-6)  # as clip_grad_norm_
        if self._up_stream is not None:
            self._up_stream.wait_event(backward_done)
        for bucket, (indices, optimizer) in enumerate(zip(self._buckets, self._optimizers)):
            grads = [self.masters[i].grad for i in indices]
            if scale < 1:
                torch._foreach_mul_(grads, scale)
            optimizer.param_groups[0].update(hyper)
            optimizer.step()
            self._upload(bucket, indices)
        self._fresh = [True] * len(self.params)
        self._squares = [None] * len(self.params)
        self._squared_on_gpu = set()

    def _upload(self, bucket: int, indices: Sequence[int]) -> None:
        with torch.no_grad():
            if self._up_stream is None:
                for i in indices:
                    self.params[i].data.copy_(self.masters[i])
            else:
                if self._uploaded[bucket] is not None:
                    self._uploaded[bucket].synchronize()  # the last upload has read the masters
                with torch.cuda.stream(self._up_stream):  # float32 over PCIe, cast on the GPU
                    for i in indices:
                        self.params[i].data.copy_(self.masters[i].to(self.device, non_blocking=True))
                    self._uploaded[bucket] = torch.cuda.Event()
                    self._uploaded[bucket].record()
        self._ready[bucket].set()

    # ------------------------------------------------------------ checkpoints
    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights, optimizer) in the layout of `torch.distributed.checkpoint`'s full state dicts."""
        self.synchronize()
        model = {name: master.detach().clone() for name, master in zip(self.names, self.masters)}
        state = {}
        for indices, optimizer in zip(self._buckets, self._optimizers):
            for i in indices:
                if self.masters[i] in optimizer.state:
                    state[self.names[i]] = {k: v.clone() for k, v in optimizer.state[self.masters[i]].items()}
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(self.names)}
                  for group in self.lead.param_groups]
        return model, {"state": state, "param_groups": groups}

    def load_state_dicts(self, model: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
        """Restore what `state_dicts` wrote and upload the weights."""
        self.synchronize()
        with torch.no_grad():
            for name, master in zip(self.names, self.masters):
                master.copy_(model[name])
        for indices, bucket_optimizer in zip(self._buckets, self._optimizers):
            for i in indices:
                if self.names[i] in optimizer["state"]:
                    bucket_optimizer.state[self.masters[i]] = {
                        key: value.detach().to("cpu", copy=True) for key, value in optimizer["state"][self.names[i]].items()}
        saved = {key: value for key, value in optimizer["param_groups"][0].items() if key in HYPERPARAMETERS}
        for group in [*self.lead.param_groups, *(o.param_groups[0] for o in self._optimizers)]:
            group.update(saved)
        for bucket, indices in enumerate(self._buckets):
            self._upload(bucket, indices)
        if self._up_stream is not None:
            self._up_stream.synchronize()


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors (outside checkpointed layers) go to pinned CPU memory; backward prefetches one ahead.

    Use as a context manager around the forward. Tensors smaller than `min_bytes` and parameters are
    kept as they are; a tensor saved several times (e.g. the rotary tables every layer receives) is
    copied once per forward. On a CPU run the copies are plain ones (same bookkeeping, no saving).
    """

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.min_bytes = min_bytes
        self._stream: torch.cuda.Stream | None = None
        self._stored: dict[int, dict[str, Any]] = {}
        self._by_tensor: dict[int, tuple[int, Any]] = {}
        self._next_key = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "ActivationOffload":
        self.release()  # deduplication is per forward; the previous backward is over
        return super().__enter__()

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes
                or tensor.layout != torch.strided):
            return tensor
        seen = self._by_tensor.get(id(tensor))
        if seen is not None and seen[1]() is tensor and seen[0] in self._stored:  # the same live tensor again
            self._stored[seen[0]]["uses"] += 1
            return seen[0]
        key, self._next_key = self._next_key, self._next_key + 1
        host = _pinned(tensor.shape, tensor.dtype, tensor.device)
        entry = {"host": host, "device": tensor.device, "uses": 1, "copied": None, "ready": None}
        if tensor.device.type == "cuda":
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                entry["copied"] = torch.cuda.Event()
                entry["copied"].record()
            tensor.record_stream(stream)
        else:
            host.copy_(tensor)
        self._stored[key] = entry
        self._by_tensor[id(tensor)] = (key, weakref.ref(tensor))
        return key

    def release(self) -> None:
        """Drop whatever backward did not take back (call after each backward)."""
        self._stored.clear()
        self._by_tensor.clear()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _fetch(self, key: int) -> None:
        """Start bringing a stored tensor back (no-op if already on its way)."""
        entry = self._stored.get(key)
        if entry is None or entry["ready"] is not None:
            return
        if entry["device"].type != "cuda":
            entry["ready"] = (entry["host"].clone(), None)
            return
        current = torch.cuda.current_stream(entry["device"])
        target = torch.empty(entry["host"].shape, dtype=entry["host"].dtype, device=entry["device"])
        stream = self._side_stream(entry["device"])
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            if entry["copied"] is not None:
                stream.wait_event(entry["copied"])
            target.copy_(entry["host"], non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
        target.record_stream(stream)
        entry["ready"] = (target, arrived)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        key = packed
        self._fetch(key)
        entry = self._stored[key]
        target, arrived = entry["ready"]
        if arrived is not None:
            torch.cuda.current_stream(entry["device"]).wait_event(arrived)
        # backward runs layers in reverse: the tensor stored before this one is needed next
        previous = max((k for k in self._stored if k < key), default=None)
        if previous is not None:
            self._fetch(previous)
        entry["uses"] -= 1
        if entry["uses"] <= 0:
            del self._stored[key]
        return target


class CpuEmbedding(nn.Module):
    """A frozen input embedding kept in CPU memory: rows are looked up there and sent to `device`.

    Given token ids already in CPU memory (the batch before it went to the GPU), nothing waits for
    the GPU: rows are gathered into a pinned buffer and copied over asynchronously.
    """

    host_lookup = True  # callers may pass token ids that are still in CPU memory

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        table = embedding.weight.detach().to("cpu")
        # A plain attribute, not a parameter or buffer: `model.to(device)` must not move it back.
        self._table = table.pin_memory() if device.type == "cuda" else table
        self.padding_idx, self.target = embedding.padding_idx, device
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self._staging: torch.Tensor | None = None
        self._sent: Any = None

    @property
    def weight(self) -> torch.Tensor:
        """The embedding table (in CPU memory)."""
        return self._table

    def staging_rows(self, count: int) -> torch.Tensor:
        """A [count, embedding_dim] view of the staging buffer (pinned for a GPU), grown as needed.

        Always an ordinary tensor, even when first allocated under inference mode (the reference
        pass runs there before training): training writes into it, and an inference tensor may not
        be updated in place outside inference mode.
        """
        size = count * self.embedding_dim
        if self._staging is None or self._staging.numel() < size or self._staging.is_inference():
            with torch.inference_mode(False):
                self._staging = torch.empty(size, dtype=self._table.dtype, pin_memory=self.target.type == "cuda")
        return self._staging[:size].view(count, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)
        if self.target.type != "cuda":
            return self._table.index_select(0, ids).view(*input_ids.shape, -1)
        if self._sent is not None:
            self._sent.synchronize()  # the previous rows have left the staging buffer
        rows = self.staging_rows(ids.numel())
        torch.index_select(self._table, 0, ids, out=rows)
        moved = rows.to(self.target, non_blocking=True)
        self._sent = torch.cuda.Event()
        self._sent.record()
        return moved.view(*input_ids.shape, self.embedding_dim)


def offload_input_embeddings(model: nn.Module) -> int | None:
    """Replace the model's (frozen) input embedding by a `CpuEmbedding`; GPU bytes freed (None: tied, kept)."""
    embedding = model.get_input_embeddings()
    if embedding.weight.requires_grad:
        raise ValueError("offload_embeddings needs a frozen input embedding (it is not trained with LoRA)")
    if embedding.weight is getattr(model.get_output_embeddings(), "weight", None):
        return None  # tied to the output head, which needs it on the GPU anyway
    freed = embedding.weight.numel() * embedding.weight.element_size()
    model.set_input_embeddings(CpuEmbedding(embedding, embedding.weight.device))
    return freed if embedding.weight.device.type == "cuda" else 0
