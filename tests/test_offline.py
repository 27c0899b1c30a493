"""Proof that the suite is offline: outbound connections and DNS fail, loopback works."""

import socket
import threading
import urllib.request

import pytest

from tests.conftest import NetworkBlocked

pytestmark = pytest.mark.network


def test_outbound_connection_is_blocked():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_dns_lookup_is_blocked():
    with pytest.raises(NetworkBlocked):
        socket.getaddrinfo("huggingface.co", 443)


def test_http_client_to_hub_is_blocked():
    with pytest.raises(Exception) as info:
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=1)
    assert "offline" in str(info.value) or isinstance(info.value.__cause__, NetworkBlocked) or \
        isinstance(getattr(info.value, "reason", None), NetworkBlocked)


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()))
    thread.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    thread.join(timeout=2)
    client.close()
    server.close()
    assert accepted
