"""Shared fixtures: offline guard, tiny models of real architectures, a tiny model folder.

No test may touch the network. Every socket connection to a non-loopback address raises
`NetworkBlocked`; loopback stays open for the in-process HTTP stand-ins some tests start.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

# Tiny models run fastest on one thread; with two, OpenMP spin-waits make them ~10-100x slower
# whenever a subprocess (kill/resume, two-process training, the server) shares the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


class NetworkBlocked(RuntimeError):
    """Raised when a test tries to reach a non-loopback address."""


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkBlocked(f"test tried to reach {address!r}: tests must stay offline")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkBlocked(f"test tried to reach {address!r}: tests must stay offline")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_loopback((host,)):
        raise NetworkBlocked(f"test tried to resolve {host!r}: tests must stay offline")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Block every non-loopback connection and DNS lookup for the duration of each test."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point the model cache at a per-session temporary folder."""
    monkeypatch.setenv("CHARACTER_BAKER_CACHE", str(tmp_path_factory.getbasetemp() / "cb-cache"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread for every test (OMP_NUM_THREADS above covers subprocesses and start-up)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tok():
    """The test kit's ChatML tokenizer."""
    from character_baker.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_lm(request, tiny_tok):
    """A tiny random model of each real architecture (Llama, Qwen2) with its tokenizer."""
    from character_baker.testing import tiny_model

    return tiny_model(request.param, tiny_tok), tiny_tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a standard Hugging Face folder (usable as a model reference)."""
    from character_baker.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from character_baker.cli import main

    def run(*argv: str):
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
