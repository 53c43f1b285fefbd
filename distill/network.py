"""Whether a network endpoint answers: one TCP connection, tried once, with a timeout. What the Hub
code (models/sources.py, data/hf_datasets.py, sharing/hub.py) asks before it waits on a download."""
from __future__ import annotations


def endpoint_reachable(url: str, timeout: float) -> tuple[bool, str]:
    """(True, "") when one TCP connection to `url`'s host and port (443 for https, else 80 when the URL
    names none) succeeds within `timeout` seconds; else (False, the reason in one line)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        return False, f"{type(e).__name__}: {e}".strip()
    return True, ""
