"""The smart client: calls go straight to their key's owner."""

import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import grpc

from ._proto.leasehold.v1 import entities_pb2, entities_pb2_grpc
from .errors import LeaseholdError, Reason, classify
from .routing import Route, Router, RoutingTable

__all__ = ["CallResult", "Client", "Location", "TlsConfig"]

log = logging.getLogger(__name__)

Metadata = Union[Mapping[str, str], Sequence[tuple[str, Union[str, bytes]]]]

FIRST_TABLE_TIMEOUT = 5.0
"""Seconds a new routing stream may take to deliver its first table."""

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Notice a dead connection under the routing stream within about 40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect soon to an instance that restarted on the same address.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
"""Options of every channel the client opens (``channel_options`` adds to or overrides
them)."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the client plane: the CA (PEM) that signs the servers' certificates, and a
    client certificate and key (PEM) for servers that require one."""

    root_certificates: bytes
    certificate_chain: Optional[bytes] = None
    private_key: Optional[bytes] = None
    server_name: Optional[str] = None
    """Name the servers' certificates carry, when it is not the host dialled."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its key go together")

    @classmethod
    def from_files(
        cls,
        ca: str,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        server_name: Optional[str] = None,
    ) -> "TlsConfig":
        """Reads the PEM files."""

        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True)
class CallResult:
    """A handler's answer."""

    payload: bytes
    shard: int
    epoch: int
    """Fencing token of the ownership the handler ran under."""
    owner: str
    """Member id of the owner that ran the handler."""
    forwarded: bool
    """The owner is not the member the client sent the call to, so the call took a hop
    between instances. ``False`` when the client did not know which member it sent the
    call to (no routing table yet)."""


@dataclass(frozen=True)
class Location:
    """Where a key lives."""

    shard: int
    owner: Optional[str]
    """Member id of the owner; ``None`` when the shard has no owner now."""
    address: Optional[str]
    """Client address of the owner (``host:port``)."""
    epoch: int


class _Backoff:
    """Exponential back-off with jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self._initial

    def pause(self) -> float:
        """The next pause (half of it fixed, half random), doubling the one after."""
        current = self._next
        self._next = min(current * 2, self._maximum)
        return current / 2 + random.uniform(0, current / 2)


class Client:
    """A Leasehold client that sends each call straight to its key's owner.

    A background thread watches the routing table (``Entities/WatchRouting``) from one
    instance at a time, moving to another seed or known member when the stream ends or
    fails. Each call goes to the owner of its key's shard as the table (or a more recent
    answer) names it, else to any instance, which forwards it. Calls that certainly did
    not run are retried, within the call's deadline. Thread-safe; use one client per
    process.

    Args:
        seeds: Client addresses (``host:port``) of some instances, or one string of
            comma-separated addresses.
        tls: TLS settings; plain-text channels without.
        default_timeout: Deadline in seconds of a call that names none.
        channel_options: gRPC channel options, added to :data:`DEFAULT_CHANNEL_OPTIONS`.
        watch: Watch the routing table; without it every call goes to any instance.
        retry_backoff: First and largest pause in seconds between attempts of a call.
        watch_backoff: First and largest pause in seconds between routing streams.
    """

    def __init__(
        self,
        seeds: Union[str, Sequence[str]],
        *,
        tls: Optional[TlsConfig] = None,
        default_timeout: float = 10.0,
        channel_options: Sequence[tuple[str, object]] = (),
        watch: bool = True,
        retry_backoff: tuple[float, float] = (0.02, 0.5),
        watch_backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        if isinstance(seeds, str):
            seeds = seeds.split(",")
        self._router = Router([s.strip() for s in seeds])
        self._credentials = tls.credentials() if tls is not None else None
        options = dict(DEFAULT_CHANNEL_OPTIONS)
        if tls is not None and tls.server_name:
            options["grpc.ssl_target_name_override"] = tls.server_name
        options.update(channel_options)
        self._options = list(options.items())
        self.default_timeout = default_timeout
        self._retry_backoff = retry_backoff
        self._watch_backoff = watch_backoff
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._channels: dict[str, tuple[grpc.Channel, entities_pb2_grpc.EntitiesStub]] = {}
        self._watch_call = None
        self._watcher: Optional[threading.Thread] = None
        if watch:
            self._watcher = threading.Thread(
                target=self._watch, name="leasehold-routing", daemon=True
            )
            self._watcher.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops watching the routing table and closes every channel (calls in progress
        fail with ``CANCELLED``). Idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            call = self._watch_call
        if call is not None:
            call.cancel()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel, _ in channels:
            channel.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def routing(self) -> Optional[RoutingTable]:
        """The latest routing table (an immutable snapshot), or ``None`` before the first."""
        return self._router.table

    def wait_for_table(self, timeout: Optional[float] = None, *, complete: bool = False) -> bool:
        """Waits for the first routing table (with an owner for every shard when
        ``complete``), at most ``timeout`` seconds; returns whether it came."""
        return self._router.wait_for_table(timeout, complete=complete)

    def call(
        self,
        key: str,
        payload: bytes,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> CallResult:
        """Runs the handler for ``key`` at the key's owner and returns its answer.

        Failures that certainly did not run the call (Leasehold errors marked retryable,
        and failures to connect) are retried after a short back-off, or at once on another
        instance, until ``timeout`` (default :attr:`default_timeout`) seconds have passed.

        Raises:
            LeaseholdError: the call failed; ``retryable`` tells whether it certainly did
                not run.
        """
        request = entities_pb2.CallRequest(key=key, payload=bytes(payload))
        response, route = self._invoke("Call", request, key, timeout, metadata)
        forwarded = route.member is not None and route.member != response.owner
        if response.owner and (route.member != response.owner or not route.direct):
            self._router.learn_owner(response.shard, response.owner)
        return CallResult(
            payload=response.payload,
            shard=response.shard,
            epoch=response.epoch,
            owner=response.owner,
            forwarded=forwarded,
        )

    def locate(self, key: str, timeout: Optional[float] = None) -> Location:
        """Where ``key`` lives, from the routing table; asks an instance (``Locate``) when
        there is no table or its hash version is unknown to this client.

        Raises:
            LeaseholdError: the ``Locate`` call failed.
        """
        table = self._router.table
        if table is not None and table.computes_shards:
            shard = table.shard_of(key)
            owner = table.owner(shard)
            return Location(
                shard=shard,
                owner=owner.id if owner else None,
                address=owner.address if owner else None,
                epoch=table.epoch(shard),
            )
        request = entities_pb2.LocateRequest(key=key)
        response, _ = self._invoke("Locate", request, key, timeout, None)
        return Location(
            shard=response.shard,
            owner=response.owner or None,
            address=response.address or None,
            epoch=response.epoch,
        )

    def _stub(self, address: str) -> entities_pb2_grpc.EntitiesStub:
        with self._lock:
            if self._closed.is_set():
                raise _closed_error()
            entry = self._channels.get(address)
            if entry is None:
                if self._credentials is not None:
                    channel = grpc.secure_channel(address, self._credentials, self._options)
                else:
                    channel = grpc.insecure_channel(address, self._options)
                entry = (channel, entities_pb2_grpc.EntitiesStub(channel))
                self._channels[address] = entry
            return entry[1]

    def _invoke(self, method: str, request, key: str, timeout, metadata):
        """Sends ``request`` to the instance routing picks for ``key``, retrying failures
        that did not run it until the deadline. Returns the response and its route."""
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if isinstance(metadata, Mapping):
            metadata = tuple(metadata.items())
        backoff = _Backoff(*self._retry_backoff)
        avoid = set()
        last: Optional[LeaseholdError] = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if last is not None:
                    raise last
                raise LeaseholdError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the deadline passed before the call was sent",
                    retryable=True,
                )
            route: Route = self._router.route(key, avoid)
            stub = self._stub(route.address)
            try:
                return getattr(stub, method)(request, timeout=remaining, metadata=metadata), route
            except grpc.RpcError as e:
                error = classify(e)
                error.__cause__ = e
            except ValueError as e:
                if self._closed.is_set():
                    raise _closed_error() from e
                raise
            if self._closed.is_set():
                raise _closed_error() from error
            if not error.retryable:
                raise error
            last = error
            if error.connect_failed:
                log.debug("cannot connect to %s: %s", route.address, error.message)
                self._router.mark_unreachable(route.address)
                avoid.add(route.address)
                if any(a not in avoid for a in self._router.addresses()):
                    continue
                avoid.clear()
            elif error.reason == Reason.NOT_OWNER:
                self._learn_from_not_owner(error)
            pause = min(backoff.pause(), deadline - time.monotonic())
            if pause > 0 and self._closed.wait(pause):
                raise _closed_error() from error

    def _learn_from_not_owner(self, error: LeaseholdError) -> None:
        try:
            shard = int(error.metadata["shard"])
        except (KeyError, ValueError):
            return
        self._router.learn_owner(shard, error.metadata.get("owner", ""))

    def _watch(self) -> None:
        """Keeps a routing stream open to one instance at a time until the client closes."""
        backoff = _Backoff(*self._watch_backoff)
        while not self._closed.is_set():
            address = self._router.watch_address()
            try:
                call = self._stub(address).WatchRouting(entities_pb2.WatchRoutingRequest())
            except LeaseholdError:
                return
            with self._lock:
                self._watch_call = call
                closed = self._closed.is_set()
            if closed:
                call.cancel()
                return
            # An instance without a current table sends nothing: give up on it after a
            # while and watch another.
            got_table = threading.Event()
            timer = threading.Timer(
                FIRST_TABLE_TIMEOUT, lambda: got_table.is_set() or call.cancel()
            )
            timer.daemon = True
            timer.start()
            try:
                for message in call:
                    got_table.set()
                    self._router.offer(RoutingTable.from_proto(message))
                    backoff.reset()
                log.debug("routing stream from %s ended", address)
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                error = classify(e)
                if error.connect_failed:
                    self._router.mark_unreachable(address)
                log.debug("routing stream from %s failed: %s", address, error)
            except Exception:
                if self._closed.is_set():
                    return
                log.warning("routing stream from %s failed", address, exc_info=True)
            finally:
                timer.cancel()
                with self._lock:
                    self._watch_call = None
            if self._closed.wait(backoff.pause()):
                return


def _closed_error() -> LeaseholdError:
    return LeaseholdError(grpc.StatusCode.CANCELLED, "the client is closed")
