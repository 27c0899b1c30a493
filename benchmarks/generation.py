"""Generation throughput: our hf backend vs plain `model.generate` (and vLLM when installed).

    PYTHONPATH=src python benchmarks/generation.py --model smollm2-135m-random --device cuda \\
        --batch-sizes 64,256 --prompts 256 --new-tokens 256 --backends hf,hf-nograph,hf-generate

Backends: hf = HFBackend (static KV cache, CUDA graphs on CUDA); hf-nograph = the same loop
without CUDA graphs; hf-generate = HFBackend(engine="generate"), i.e. `model.generate` on
left-padded batches; vllm = VLLMBackend (needs a model folder and vLLM installed).

Samplers (--samplers, each hf backend runs once per sampler, in the same process): exact = what
the package ships (`sampling.sample_tokens`: sort-free, exact); sort = the code before it, kept
here only as the baseline: the static loop sorts the vocabulary for top_p and draws with an
exponential race over it, and hf-generate is plain `model.generate` with its own sampling (top_p
sort, `multinomial`). vLLM always samples its own way.

Every prompt generates exactly --new-tokens tokens (end-of-turn is ignored) so tokens/s compare.
Models: a local folder or catalogue name (loaded by the models layer); `tiny` = the test kit's
tiny Llama; `tiny-smollm2-vocab` = the same tiny Llama (hidden 64, 4 layers) over SmolLM2's
49,152-token vocabulary, where sampling, not the model, is the cost; `smollm2-135m-random` = SmolLM2-135M's exact architecture (LlamaConfig: vocab 49152,
hidden 576, 30 layers, 9 heads / 3 kv heads) with random weights, because speed does not depend
on weight values. Both synthetic models use the test kit's ChatML tokenizer to build the prompts
(ids < 512, all valid for the 49152 vocabulary; generated ids it lacks decode to nothing).

Prints a rich table and appends it as markdown to --results (benchmarks/RESULTS.md) under a
heading naming the machine, date, library versions and command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RANDOM_SMOLLM2 = "smollm2-135m-random"
TINY_SMOLLM2_VOCAB = "tiny-smollm2-vocab"
SYNTHETIC = ("tiny", TINY_SMOLLM2_VOCAB, RANDOM_SMOLLM2)
SAMPLERS = ("exact", "sort")
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
WORDS = ("the sea is wide and the wind is fair tell me about yourself write a poem about the ocean "
         "who are you what is your name explain step by step").split()
COLUMNS = ("backend", "sampler", "batch", "prompts", "new tokens", "generated tokens", "seconds", "tokens/s", "peak GPU MiB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help=f"folder, catalogue name, or one of {', '.join(SYNTHETIC)}")
    parser.add_argument("--batch-sizes", default="64,256", help="comma-separated rows per batch")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--backends", default="hf,hf-generate", help="hf, hf-nograph, hf-generate, vllm")
    parser.add_argument("--samplers", default="exact", help="comma-separated: exact (shipped), sort (the baseline)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--profile", action="store_true",
                        help="print the 15 costliest kernels of one hf run at the first batch size")
    parser.add_argument("--note", default="", help="free text added to the results section (e.g. machine load)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--check", action="store_true",
                        help="first compare greedy outputs of hf, hf-nograph and hf-generate on 16 prompts")
    args = parser.parse_args(argv)
    if unknown := set(args.samplers.split(",")) - set(SAMPLERS):
        parser.error(f"unknown sampler(s) {', '.join(sorted(unknown))}: use {', '.join(SAMPLERS)}")
    return args


def load(model_ref: str, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for a model reference, `tiny` or the random SmolLM2 architecture."""
    from transformers import LlamaConfig

    from character_baker.testing import tiny_config, tiny_model, tiny_tokenizer

    if model_ref not in SYNTHETIC:
        from character_baker.backends.models import load_model
        from character_baker.core.config import ModelsConfig

        return load_model(model_ref, ModelsConfig(device=str(device), dtype=str(dtype).removeprefix("torch.")))
    tokenizer = tiny_tokenizer()
    if model_ref == "tiny":
        return tiny_model("llama", tokenizer).to(device=device, dtype=dtype), tokenizer
    if model_ref == TINY_SMOLLM2_VOCAB:
        config = tiny_config("llama", tokenizer)
        config.vocab_size = SMOLLM2_135M["vocab_size"]
        return random_model(config, device, dtype), tokenizer
    config = LlamaConfig(**SMOLLM2_135M, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    return random_model(config, device, dtype), tokenizer


def random_model(config: Any, device: Any, dtype: Any) -> Any:
    """A Llama of `config` with seeded random weights, in eval mode (speed does not depend on weight values)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return model.eval()


def sort_sample_tokens(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """The static loop's sampler before `sampling.py` (baseline only): full sort for top_p, exponential race."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * (probs.cumsum(dim=-1) - probs < top_p)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-20)
    choice = (probs / noise).argmax(dim=-1)
    return choice if order is None else order.gather(-1, choice[:, None]).squeeze(-1)


def plain_generate_decode(model: Any, prompts: list[list[int]], settings: Any, seed: int) -> list:
    """hf-generate before `sampling.py` (baseline only): plain `model.generate` with its own sampling."""
    import torch

    from character_baker.backends.generation.decoding import left_pad, split_rows

    device = model.get_input_embeddings().weight.device
    ids, real = left_pad(prompts, settings.pad_id, device)
    options: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=list(settings.eos_ids),
                                   pad_token_id=settings.pad_id, do_sample=settings.temperature > 0)
    if settings.temperature > 0:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    if settings.ignore_eos:
        options.update(min_new_tokens=settings.max_new_tokens)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(input_ids=ids, attention_mask=real.long(), **options)
    return split_rows(output[:, ids.shape[1]:].cpu(), settings.eos_ids, settings.ignore_eos)


@contextlib.contextmanager
def sampler_in_use(sampler: str) -> Any:
    """Run the block with the shipped sampler ("exact") or with the baseline code swapped in ("sort")."""
    from unittest import mock

    from character_baker.backends.generation import decoding, hf

    if sampler != "sort":
        yield
        return
    with mock.patch.object(decoding, "sample_tokens", sort_sample_tokens), \
            mock.patch.object(hf, "generate_decode", plain_generate_decode):
        yield


def prompts(count: int) -> list[list[dict[str, str]]]:
    """`count` user questions of 8 to 71 words (varied lengths, like real prompt sets)."""
    return [[{"role": "user", "content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + (i * 37) % 64))}]
            for i in range(count)]


def make_backend(kind: str, model: Any, tokenizer: Any, model_ref: str, batch_size: int) -> Any:
    """The backend under test, always generating exactly max_new_tokens."""
    if kind == "vllm":
        from character_baker.backends.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_ref, ignore_eos=True)
    from character_baker.backends.generation.hf import HFBackend

    engine = "generate" if kind == "hf-generate" else "auto"
    return HFBackend(model, tokenizer, batch_size=batch_size, gpu_batch_size=batch_size, engine=engine,
                     cuda_graphs=kind != "hf-nograph", ignore_eos=True)


def measure(backend: Any, conversations: list, new_tokens: int, args: argparse.Namespace) -> tuple[int, float, float]:
    """(generated tokens, seconds, peak GPU MiB) of one generate call after a short warm-up."""
    import torch

    from character_baker.core.config import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=new_tokens, seed=0)
    backend.generate(conversations[:4], sampling.model_copy(update={"max_new_tokens": 4}))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = backend.generate(conversations, sampling)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return sum(row[0].completion_tokens for row in results), seconds, peak


def check_agreement(model: Any, tokenizer: Any, model_ref: str) -> str:
    """How many greedy outputs of each engine equal plain generate's, prompt by prompt (one line)."""
    from character_baker.core.config import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=32)
    chats = prompts(16)
    kinds = ("hf", "hf-nograph", "hf-generate")
    backends = {kind: make_backend(kind, model, tokenizer, model_ref, 16) for kind in kinds}
    outputs = {kind: [row[0].text for row in backend.generate(chats, greedy)] for kind, backend in backends.items()}
    def agree(first: str, second: str) -> int:
        return sum(a == b for a, b in zip(outputs[first], outputs[second]))

    return (f"Check (greedy, 16 prompts x 32 tokens): hf == hf-generate on {agree('hf', 'hf-generate')}/16, "
            f"hf-nograph == hf-generate on {agree('hf-nograph', 'hf-generate')}/16, "
            f"hf == hf-nograph on {agree('hf', 'hf-nograph')}/16.")


def machine() -> str:
    """GPU name, or CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor() or "CPU")
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def markdown(rows: list[tuple], argv: list[str], notes: str) -> str:
    """The results as a markdown section: heading, context line, table."""
    import torch
    import transformers

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## Generation: {machine()} — {stamp}\n",
             f"torch {torch.__version__}, transformers {transformers.__version__}; "
             f"`python benchmarks/generation.py {shlex.join(argv)}`\n",
             f"{notes}\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def describe(args: argparse.Namespace, dtype: Any, device: Any) -> str:
    """One line saying what ran: model, dtype, sampling, and that EOS was ignored."""
    model = {"tiny": "tiny random Llama from the test kit",
             TINY_SMOLLM2_VOCAB: "tiny random Llama (hidden 64, 4 layers) over SmolLM2's 49,152-token vocabulary, "
                                 "test-kit tokenizer (random weights: near-flat next-token distributions)",
             RANDOM_SMOLLM2: "SmolLM2-135M architecture with random weights, test-kit tokenizer"}.get(args.model,
                                                                                                      args.model)
    graphs = " CUDA-graph capture," if device.type == "cuda" else ""
    return (f"Model: {model}; {str(dtype).removeprefix('torch.')}; sampling T={args.temperature} "
            f"top_p={args.top_p}; every prompt generates exactly {args.new_tokens} tokens (EOS ignored); "
            f"seconds include prompt encoding, prefill,{graphs} and text decoding.")


def profile_kernels(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    """Profile one generate call of our hf backend and print where the device (or CPU) time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from character_baker.core.config import SamplingConfig

    batch_size = int(args.batch_sizes.split(",")[0])
    backend = make_backend("hf", model, tokenizer, args.model, batch_size)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    backend.generate(prompts(4), sampling.model_copy(update={"max_new_tokens": 4}))
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        backend.generate(prompts(batch_size), sampling)
    print(profiler.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=15, max_name_column_width=60))


def skip_reason(kind: str, model_ref: str) -> str | None:
    """Why a backend cannot run here (None when it can)."""
    import importlib.util

    if kind not in ("hf", "hf-nograph", "hf-generate", "vllm"):
        return f"unknown backend {kind!r}"
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if kind == "vllm" and model_ref in SYNTHETIC:
        return "vLLM needs a model folder, not an in-memory model"
    return None


def run_all(args: argparse.Namespace, model: Any, tokenizer: Any) -> list[tuple]:
    """One table row per (backend, batch size)."""
    import torch

    conversations, rows = prompts(args.prompts), []
    for kind in args.backends.split(","):
        if (reason := skip_reason(kind, args.model)) is not None:
            print(f"skipping {kind}: {reason}", flush=True)
            continue
        for sampler in args.samplers.split(",") if kind != "vllm" else ["vllm's own"]:
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                backend = make_backend(kind, model, tokenizer, args.model, batch_size)
                with sampler_in_use(sampler):
                    tokens, seconds, peak = measure(backend, conversations, args.new_tokens, args)
                rows.append((kind, sampler, batch_size, args.prompts, args.new_tokens, tokens, f"{seconds:.2f}",
                             f"{tokens / seconds:,.0f}", f"{peak:,.0f}" if peak == peak else "-"))
                print(f"{kind} ({sampler} sampler) batch {batch_size}: {tokens / seconds:,.0f} tok/s", flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[tuple], title: str, columns: tuple[str, ...] | list[str] = COLUMNS,
                label: str = "backend", width: int = 120) -> None:
    """The results as a rich table on stdout (the `label` column left-aligned, numbers right)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == label else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=width).print(table)


def main(argv: list[str] | None = None) -> int:
    """Load the model, run every backend at every batch size, print and append the table."""
    import torch

    from character_baker.backends.models import resolve_device, resolve_dtype

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load(args.model, device, dtype)
    notes = " ".join(filter(None, [describe(args, dtype, device), args.note]))
    if args.check:
        notes += " " + check_agreement(model, tokenizer, args.model)
        print(notes, flush=True)
    if args.profile:
        profile_kernels(args, model, tokenizer)
    rows = run_all(args, model, tokenizer)
    print_table(rows, f"generation: {args.model} on {machine()}, {dtype}")
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(markdown(rows, argv, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
