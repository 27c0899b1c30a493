"""Serving load test: N concurrent clients (the official `openai` package) against a server on loopback.

    # the GPU target (one H200): launch our server on SmolLM2-135M, then 256 concurrent streaming clients
    PYTHONPATH=src python benchmarks/serve.py --serve HuggingFaceTB/SmolLM2-135M-Instruct --serve-args "--max-concurrency 256 --max-queue 512" --clients 256 --modes stream --max-tokens 128 --baseline-requests 5

    # the CPU target: the test kit's tiny model, 200 concurrent requests, streaming and not
    PYTHONPATH=src python benchmarks/serve.py --serve tiny --clients 200 --max-tokens 32

    # or measure a server that is already running (ours or `vllm serve`):
    PYTHONPATH=src python benchmarks/serve.py --url http://127.0.0.1:8000/v1 --model pirate --clients 64

Each of --clients concurrent clients sends its share of --requests chat requests (default one each:
a burst), streaming or not (--modes), and the script prints, per mode: requests/s, generated
tokens/s (from the usage counts), p50/p95 time to first token (streaming: the first content
chunk; not streaming: the whole answer) and total latency, and how many requests were refused
(an HTTP error status: 429 queue full, 503 queue timeout) or lost (no complete answer: connection
errors, client timeouts, broken streams). A single-client baseline (--baseline-requests, one
request at a time) gives one client's generated tokens/s, and the table shows how many times
that the concurrent run achieved. Results go to --results (benchmarks/RESULTS.md) under a heading
naming the machine, date, versions and command line.

`--serve` takes what `character-baker serve` takes (a run, a folder of runs, a model) or `tiny`
(the test kit's tiny Llama, written to a temporary folder); the server runs as a subprocess on a
free loopback port with `--engine transformers` plus --serve-args, and is stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from generation import machine, print_table  # benchmarks/generation.py: the machine line; a rich table

QUESTIONS = ["Who are you?", "Tell me about yourself.", "Write a short poem about the sea.",
             "Explain step by step how a sail catches the wind.", "What is the capital of France?",
             "Give me three tips for a long voyage.", "What would you do with a map to buried treasure?",
             "Describe your ship in a few sentences."]
COLUMNS = ("mode", "clients", "requests", "ok", "refused", "lost", "seconds", "requests/s", "tokens/s",
           "x one client", "TTFT p50 s", "TTFT p95 s", "latency p50 s", "latency p95 s")
API_KEY = "benchmark-key"


@dataclass(frozen=True)
class Outcome:
    """One request: 'ok', 'refused' (an HTTP error status) or 'lost'; its timings and generated tokens."""

    status: str
    first_token_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running OpenAI-compatible server (loopback only)")
    target.add_argument("--serve", help="launch `character-baker serve SERVE` first (a run, folder, model or 'tiny')")
    parser.add_argument("--serve-args", default="", help="extra `serve` flags when launching, e.g. '--max-concurrency 256'")
    parser.add_argument("--model", default=None, help="model id to ask (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("CHARACTER_BAKER_API_KEY", API_KEY))
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default: one per client)")
    parser.add_argument("--modes", default="stream,plain", help="comma-separated: stream, plain")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    parser.add_argument("--baseline-requests", type=int, default=3, help="single-client requests (0 = skip)")
    parser.add_argument("--note", default="", help="free text for the results (e.g. 'CPU shared with other jobs')")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.url and not _is_loopback_url(args.url):
        parser.error("--url must be a loopback address (127.0.0.1, ::1 or localhost)")
    return args


def _is_loopback_url(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_reference(ref: str, scratch: Path) -> str:
    """The reference to hand `serve`: 'tiny' becomes a saved tiny model folder."""
    if ref != "tiny":
        return ref
    from character_baker.testing import save_tiny_model

    return str(save_tiny_model(scratch / "tiny"))


def _wait_healthy(url: str, process: subprocess.Popen, api_key: str, timeout_s: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {api_key}"}, timeout=2).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve did not answer /health within {timeout_s:.0f} s")


@contextmanager
def launched_server(args: argparse.Namespace) -> Iterator[str]:
    """`character-baker serve` in a subprocess on a free loopback port; yields its /v1 URL."""
    with tempfile.TemporaryDirectory() as scratch:
        port = _free_port()
        argv = [sys.executable, "-m", "character_baker", "serve", _serve_reference(args.serve, Path(scratch)),
                "--engine", "transformers", "--port", str(port), *shlex.split(args.serve_args)]
        print("$ " + shlex.join(argv[2:]), flush=True)
        process = subprocess.Popen(argv, env={**os.environ, "CHARACTER_BAKER_API_KEY": args.api_key})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, args.api_key)
            yield f"{url}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# ----------------------------------------------------------------------------- the clients
async def one_request(client, model: str, question: str, stream: bool, args: argparse.Namespace) -> Outcome:
    """Send one chat request and time it; never raises."""
    import openai

    ask = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens,
               temperature=args.temperature)
    start = time.perf_counter()
    try:
        if not stream:
            reply = await client.chat.completions.create(**ask)
            total = time.perf_counter() - start
            return Outcome("ok", total, total, reply.usage.completion_tokens)
        first, tokens, finished = None, 0, False
        async for chunk in await client.chat.completions.create(**ask, stream=True,
                                                                stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        total = time.perf_counter() - start
        return Outcome("ok", first if first is not None else total, total, tokens) if finished else Outcome("lost")
    except openai.APIStatusError:
        return Outcome("refused")
    except (openai.APIError, OSError, asyncio.TimeoutError):
        return Outcome("lost")


async def run_load(url: str, model: str, clients: int, requests: int, stream: bool,
                   args: argparse.Namespace) -> tuple[list[Outcome], float]:
    """`requests` requests from `clients` concurrent clients sharing one connection pool; (outcomes, seconds)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=args.timeout)
    async with openai.AsyncOpenAI(base_url=url, api_key=args.api_key, max_retries=0, http_client=http_client) as client:
        shares = [range(number, requests, clients) for number in range(clients)]

        async def one_client(share: range) -> list[Outcome]:
            return [await one_request(client, model, QUESTIONS[index % len(QUESTIONS)], stream, args)
                    for index in share]

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one_client(share) for share in shares))
        return [outcome for group in outcomes for outcome in group], time.perf_counter() - start


def first_model(url: str, api_key: str) -> str:
    """The first id of /v1/models (a run's character comes first)."""
    import openai

    return openai.OpenAI(base_url=url, api_key=api_key, max_retries=0).models.list().data[0].id


# ----------------------------------------------------------------------------- the table
def percentile(values: list[float], share: float) -> float:
    """The `share` quantile (0..1) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_row(mode: str, clients: int, outcomes: list[Outcome], seconds: float,
                one_client_rate: float | None) -> tuple:
    """One table row from a run's outcomes."""
    done = [outcome for outcome in outcomes if outcome.status == "ok"]
    tokens_per_s = sum(outcome.tokens for outcome in done) / seconds
    ratio = f"{tokens_per_s / one_client_rate:.1f}" if one_client_rate else "-"
    first = [outcome.first_token_s for outcome in done]
    total = [outcome.total_s for outcome in done]
    counts = {status: sum(outcome.status == status for outcome in outcomes) for status in ("ok", "refused", "lost")}
    return (mode, clients, len(outcomes), counts["ok"], counts["refused"], counts["lost"], f"{seconds:.2f}",
            f"{len(done) / seconds:.2f}", f"{tokens_per_s:,.0f}", ratio, f"{percentile(first, 0.5):.3f}",
            f"{percentile(first, 0.95):.3f}", f"{percentile(total, 0.5):.3f}", f"{percentile(total, 0.95):.3f}")


def markdown(rows: list[tuple], argv: list[str], notes: str) -> str:
    """The results as a markdown section: heading, command line, notes, table."""
    import openai

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## Serving: {machine()} — {stamp}\n",
             f"openai {openai.__version__}; `python benchmarks/serve.py {shlex.join(argv)}`\n", f"{notes}\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def measure(url: str, args: argparse.Namespace) -> tuple[str, list[tuple]]:
    """(model id, table rows): per mode, a single-client baseline then the concurrent run."""
    model = args.model or first_model(url, args.api_key)
    requests = args.requests or args.clients
    rows = []
    for mode in args.modes.split(","):
        if mode not in ("stream", "plain"):
            raise SystemExit(f"unknown mode {mode!r}: use stream and/or plain")
        stream, one_client_rate = mode == "stream", None
        asyncio.run(run_load(url, model, 1, 1, stream, args))  # warm-up
        if args.baseline_requests:
            outcomes, seconds = asyncio.run(run_load(url, model, 1, args.baseline_requests, stream, args))
            rows.append(summary_row(mode, 1, outcomes, seconds, None))
            one_client_rate = sum(outcome.tokens for outcome in outcomes) / seconds
        outcomes, seconds = asyncio.run(run_load(url, model, args.clients, requests, stream, args))
        rows.append(summary_row(mode, args.clients, outcomes, seconds, one_client_rate))
        print(f"{mode}: {rows[-1][3]}/{requests} ok in {seconds:.1f} s", flush=True)
    return model, rows


def main(argv: list[str] | None = None) -> int:
    """Start (or reach) the server, run the load, print the table and append it to the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with (launched_server(args) if args.serve else _existing(args.url)) as url:
        model, rows = measure(url, args)
    notes = " ".join(filter(None, [
        f"Model {model!r} ({server_description(args)}); {args.clients} concurrent clients on the same machine "
        f"(openai AsyncOpenAI, one connection each); max_tokens {args.max_tokens}, temperature {args.temperature}; "
        "tokens/s counts generated tokens (usage); 'x one client' = tokens/s over the single-client row's.",
        args.note]))
    print_table(rows, f"serving {model} on {machine()}", COLUMNS, label="mode", width=200)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(markdown(rows, argv, notes))
    return 0


def server_description(args: argparse.Namespace) -> str:
    """How the server ran: the `serve` command line this script launched, or the URL it was given."""
    if not args.serve:
        return f"a running server at {args.url}"
    command = shlex.join(["character-baker", "serve", args.serve, "--engine", "transformers",
                          *shlex.split(args.serve_args)])
    return f"launched as `{command}`"


@contextmanager
def _existing(url: str) -> Iterator[str]:
    yield url.rstrip("/")


if __name__ == "__main__":
    sys.exit(main())
