"""distill.network.endpoint_reachable: one TCP connection, on the URL's port or the scheme's."""
from __future__ import annotations

import socket

from distill.network import endpoint_reachable


def test_a_listening_local_port_is_reachable_and_a_closed_one_is_not_with_the_reason():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert endpoint_reachable(f"http://127.0.0.1:{port}/some/path", timeout=2.0) == (True, "")
    ok, reason = endpoint_reachable(f"http://127.0.0.1:{port}", timeout=2.0)  # closed now
    assert not ok and reason.startswith("ConnectionRefusedError") and "\n" not in reason


def test_the_port_comes_from_the_url_or_its_scheme_and_the_timeout_is_passed(monkeypatch):
    seen = []

    class Connection:
        def close(self):
            pass

    def create_connection(address, timeout):
        seen.append((address, timeout))
        return Connection()

    monkeypatch.setattr(socket, "create_connection", create_connection)
    assert endpoint_reachable("https://huggingface.co", 3.0) == (True, "")
    assert endpoint_reachable("http://mirror.local/api", 5.0) == (True, "")
    assert endpoint_reachable("https://hub.example:8443", 1.5) == (True, "")
    assert seen == [(("huggingface.co", 443), 3.0), (("mirror.local", 80), 5.0), (("hub.example", 8443), 1.5)]
