#!/usr/bin/env python3
"""/healthz latency of a node under the half-open-connection attack.

Opens CONNECTIONS connections to the node's HTTP and gRPC ports from
several loopback addresses (127.0.0.10 and up, ADDRESS_SHARE each), each
sending half a request header and nothing more, and keeps opening new ones
as the node closes them, while a client asks /healthz (a new connection per
request) every 10 ms. Prints the /healthz latency percentiles, failures and
how many attack connections were open at the end, as one JSON line.

  usage: scripts/half-open-bench.py HTTP_PORT GRPC_PORT [CONNECTIONS] [SECONDS]

Needs a descriptor limit above CONNECTIONS (ulimit -n). Loopback only.
"""
import json
import selectors
import socket
import sys
import threading
import time

http_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
total = int(sys.argv[3]) if len(sys.argv) > 3 else 8000
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
ADDRESS_SHARE = 500
stop = time.monotonic() + seconds
open_now = 0


def attack():
    """Keeps `total` half-open connections: one opened again for each the
    node closes."""
    global open_now
    sel = selectors.DefaultSelector()

    def open_one(index):
        source = f"127.0.0.{10 + index // ADDRESS_SHARE}"
        port = http_port if index % 2 == 0 else grpc_port
        half = b"GET /healthz HTTP/1.1\r\nHost: " if port == http_port else b"PRI * HTTP/2.0\r\n"
        s = socket.socket()
        try:
            s.bind((source, 0))
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            s.sendall(half)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, index)
            return True
        except OSError:
            s.close()
            return False

    for i in range(total):
        open_one(i)
    while time.monotonic() < stop:
        for key, _ in sel.select(timeout=0.2):
            s, index = key.fileobj, key.data
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                open_one(index)
        open_now = len(sel.get_map())


threading.Thread(target=attack, daemon=True).start()
time.sleep(3)  # let the flood build up

latencies, failures = [], 0
while time.monotonic() < stop:
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = c.recv(64)
            if not reply.startswith(b"HTTP/1.1 200"):
                failures += 1
            else:
                latencies.append((time.monotonic() - started) * 1000)
    except OSError:
        failures += 1
    time.sleep(0.01)

latencies.sort()


def pct(p):
    return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))], 2) if latencies else None


print(json.dumps({
    "attack_connections": total,
    "attacker_sockets_at_end": open_now,
    "healthz_requests": len(latencies) + failures,
    "healthz_failures": failures,
    "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(latencies[-1], 2) if latencies else None,
}))
