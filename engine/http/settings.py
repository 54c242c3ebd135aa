"""Where the daemon's HTTP server listens, and the bounds it holds its clients to."""

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
    # Connections open at once. Past it an idle connection gives way to the new one; when
    # none is idle the new one is refused. Lowered at start if the open-files limit is lower.
    max_connections: int = 1024
    # Seconds a client has to send a request's line and headers, from the moment it
    # connects or got its previous answer; then the connection is closed (slowloris).
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024  # a request line and headers larger get 431
    # Seconds a Data Streamer delivery has to send its whole body once its headers are in;
    # then it gets 408 (the stream sends it again).
    body_timeout: float = 30.0
