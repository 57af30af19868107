"""HTTP/2 keepalive for the long-lived connections between our services.

A peer whose host dies, freezes or drops off the network without closing its TCP connection
(power loss, a partition, a NAT or load balancer forgetting the flow, SIGSTOP) sends no RST:
without pings, a stream on that connection waits forever. That is how the router's change
feed from the Registry could look connected while no event could arrive (caches trusted for
their whole TTL), and how a stream relayed from a frozen node waited for the caller's
deadline. With keepalive the client pings every KEEPALIVE_TIME_MS and gives the connection up
KEEPALIVE_TIMEOUT_MS after an unanswered ping: its calls fail UNAVAILABLE, which every caller
already treats as "reconnect / try elsewhere". The same timeout is set for every ping
(grpc.http2.ping_timeout_ms): while a flow-control ping is unanswered, core sends no keepalive
ping, so without it a dead peer was found only by that ping's own default timeout, a minute.

Servers must accept those pings: by default gRPC answers a client pinging more often than
every 5 minutes with GOAWAY (too_many_pings, after two such pings), so `server_options` allows
one every MIN_PING_INTERVAL_MS, below the clients' period. (The argument's name is
grpc.http2.min_ping_interval_without_data_ms; gRPC ignores misspelt ones silently.)
"""

from __future__ import annotations

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000


def client_options() -> list[tuple[str, int]]:
    """Channel options for a client of another loraplex service (read at channel creation)."""
    return [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            # An idle feed or agent channel is exactly the one whose peer may vanish unnoticed.
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS)]


def server_options() -> list[tuple[str, int]]:
    """Server options accepting our clients' pings (read at server start)."""
    return [("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1)]
