"""Where the daemon's HTTP server listens."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 8080


@dataclass(frozen=True, slots=True)
class HttpSettings:
    enabled: bool = True
    # Loopback by default: /metrics and /readyz tell more than the world needs to know. Bind
    # 0.0.0.0 (behind a TLS proxy) when the Data Streamer must reach the ingress.
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests, the demo)
