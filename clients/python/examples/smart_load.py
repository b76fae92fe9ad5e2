#!/usr/bin/env python3
"""Load generator for a Leasehold cluster through the smart client.

Waits for the routing table, then calls keys ``key-0`` .. ``key-{N-1}`` from C threads
(each thread owns the keys ``i`` with ``i % C == thread``, so a key's calls are never
concurrent; the payload is the key's call counter, 1, 2, ... as ASCII) until S seconds
have passed, a file named by ``--stop-file`` appears, or SIGTERM/SIGINT. Prints one JSON
line to stdout at the end::

    {"calls": 1200, "failed": 0, "forwarded": 3, "errors": [], "owners": ["a", "b"]}

and, every second, one with the running totals to stderr. Exits 0 whatever the calls
did (exit 2 is a usage error).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Optional

# Keep stderr to the JSON progress lines: grpc-core logs connection events otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from leasehold import Client, LeaseholdError, TlsConfig

MAX_ERRORS = 10


class Stats:
    """Totals shared by the worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.failed = 0
        self.forwarded = 0
        self.errors: list[str] = []
        self.owners = set()

    def ok(self, owner: str, forwarded: bool) -> None:
        with self._lock:
            self.calls += 1
            self.forwarded += forwarded
            self.owners.add(owner)

    def fail(self, key: str, error: BaseException) -> None:
        with self._lock:
            self.failed += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(f"{key}: {error}")

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "calls": self.calls,
                "failed": self.failed,
                "forwarded": self.forwarded,
                "errors": list(self.errors),
                "owners": sorted(self.owners),
            }


def worker(client: Client, keys: list[str], timeout: float, stop: threading.Event, stats: Stats):
    """Calls `keys` in turn until `stop` is set."""
    counters = [0] * len(keys)
    i = 0
    while not stop.is_set():
        key = keys[i]
        counters[i] += 1
        try:
            result = client.call(key, str(counters[i]).encode(), timeout=timeout)
        except LeaseholdError as e:
            stats.fail(key, e)
        except Exception as e:
            stats.fail(key, repr(e))
        else:
            stats.ok(result.owner, result.forwarded)
        i = (i + 1) % len(keys)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Drive a Leasehold cluster through the smart client and report one JSON line.",
    )
    parser.add_argument("--seeds", required=True, help="client addresses host:port,host:port,...")
    parser.add_argument(
        "--keys", type=int, required=True, metavar="N", help="keys key-0 .. key-{N-1}"
    )
    parser.add_argument("--seconds", type=float, required=True, metavar="S", help="how long to run")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="C",
        help="calling threads (default 4, at most N)",
    )
    parser.add_argument("--stop-file", metavar="FILE", help="stop early once this file exists")
    parser.add_argument(
        "--ca", metavar="FILE", help="CA (PEM) of the servers' certificates: use TLS"
    )
    parser.add_argument("--cert", metavar="FILE", help="client certificate (PEM), with --key")
    parser.add_argument("--key", metavar="FILE", help="key of --cert (PEM)")
    parser.add_argument(
        "--server-name", metavar="NAME", help="name the servers' certificates carry"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECS",
        help="deadline of each call (default 10)",
    )
    parser.add_argument(
        "--table-timeout",
        type=float,
        default=30.0,
        metavar="SECS",
        help="how long to wait for a routing table with every shard owned (default 30)",
    )
    args = parser.parse_args(argv)
    if args.keys < 1 or args.concurrency < 1 or args.seconds < 0:
        parser.error("--keys and --concurrency must be positive, --seconds not negative")
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.ca is None and (args.cert or args.server_name):
        parser.error("--cert, --key and --server-name need --ca")
    return args


def log(record: dict) -> None:
    print(json.dumps(record), file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        tls = (
            TlsConfig.from_files(args.ca, args.cert, args.key, args.server_name)
            if args.ca
            else None
        )
    except OSError as e:
        print(f"smart_load.py: error: reading TLS files: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    stats = Stats()
    with Client(args.seeds, tls=tls, default_timeout=args.timeout) as client:
        if not client.wait_for_table(args.table_timeout, complete=True):
            have_table = client.routing() is not None
            log({"warning": "no routing table with every shard owned", "have_table": have_table})
        table = client.routing()
        if table is not None:
            log(
                {
                    "table": {
                        "revision": table.revision,
                        "shards": table.shard_count,
                        "members": [m.id for m in table.members],
                    }
                }
            )

        concurrency = min(args.concurrency, args.keys)
        keys = [f"key-{i}" for i in range(args.keys)]
        threads = [
            threading.Thread(
                target=worker,
                args=(client, keys[t::concurrency], args.timeout, stop, stats),
                name=f"load-{t}",
                daemon=True,
            )
            for t in range(concurrency)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        next_report = started + 1
        while not stop.is_set():
            now = time.monotonic()
            if now - started >= args.seconds or (args.stop_file and os.path.exists(args.stop_file)):
                break
            if now >= next_report:
                totals = stats.snapshot()
                log(
                    {
                        "elapsed": round(now - started, 1),
                        "calls": totals["calls"],
                        "failed": totals["failed"],
                        "forwarded": totals["forwarded"],
                    }
                )
                next_report += 1
            stop.wait(0.05)
        stop.set()
        for thread in threads:
            thread.join(timeout=args.timeout + 5)

    print(json.dumps(stats.snapshot()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
