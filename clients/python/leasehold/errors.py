"""Leasehold's errors, and how a failed RPC is classified.

Leasehold's own errors carry a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer whose details hold a ``google.rpc.ErrorInfo`` with domain ``leasehold.dev``, a
``reason`` and ``metadata["retryable"]``. A handler's own error carries none and reaches
the caller as it is.
"""

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import grpc
from google.protobuf.message import DecodeError

from ._proto.leasehold.client import rpc_pb2

__all__ = ["ERROR_DOMAIN", "LeaseholdError", "Reason", "classify"]

ERROR_DOMAIN = "leasehold.dev"
"""``ErrorInfo.domain`` of Leasehold's errors."""

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "google.rpc.ErrorInfo"

# How grpc-core's messages start for a call that failed before it was sent to any
# server: no connection could be made, or the address did not resolve.
_NOT_SENT_PREFIXES = (
    "failed to connect to all addresses",
    "dns resolution failed",
    "errors resolving",
    "empty address list",
)


class Reason:
    """The ``ErrorInfo.reason`` values Leasehold uses (``LeaseholdError.reason``)."""

    INVALID_CALL = "INVALID_CALL"
    """The call is malformed (e.g. an empty key); not retryable."""
    OVERLOADED = "OVERLOADED"
    """Queues were full; the call did not run."""
    DEADLINE_BEFORE_HANDLER = "DEADLINE_BEFORE_HANDLER"
    """The deadline passed before the handler started; the call did not run."""
    NO_OWNER_AVAILABLE = "NO_OWNER_AVAILABLE"
    """The shard had no owner able to run the call; it did not run."""
    NOT_OWNER = "NOT_OWNER"
    """The call reached an instance that does not own the shard; it did not run."""
    HANDLER_TIMEOUT = "HANDLER_TIMEOUT"
    """The handler did not answer in time; it may have run."""
    FENCED = "FENCED"
    """A Kafka record read under an older claim of its partition; refused."""
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    """The call reached its owner without an answer; it may have run."""


MetadataLike = Optional[Sequence[tuple[str, Union[str, bytes]]]]


class LeaseholdError(Exception):
    """A failed call.

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: Leasehold's ``ErrorInfo.reason`` (see :class:`Reason`), or ``None`` for a
            handler's own error or a transport failure.
        retryable: True when the call certainly did not run, so that sending it again
            (after a back-off, within the caller's deadline) is safe. The client has
            already retried such failures until the deadline.
        metadata: The ``ErrorInfo.metadata`` (empty without one). ``NOT_OWNER`` errors
            name the ``shard``, its ``owner`` and ``epoch`` there.
        connect_failed: True for a transport failure before the call was sent (no server
            saw it; ``retryable`` too).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: Optional[str] = None,
        retryable: bool = False,
        metadata: Optional[Mapping[str, str]] = None,
        connect_failed: bool = False,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.metadata = dict(metadata or {})
        self.connect_failed = connect_failed

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"LeaseholdError(code={self.code}, message={self.message!r}, "
            f"reason={self.reason!r}, retryable={self.retryable})"
        )


def error_info(trailing_metadata: MetadataLike) -> Optional[rpc_pb2.ErrorInfo]:
    """The Leasehold ``ErrorInfo`` in a call's trailers, or ``None``.

    Only an ``ErrorInfo`` whose domain is :data:`ERROR_DOMAIN` counts; an undecodable
    status is treated as absent.
    """
    for key, value in trailing_metadata or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        raw = value.encode("latin-1") if isinstance(value, str) else value
        try:
            status = rpc_pb2.Status.FromString(raw)
            for detail in status.details:
                if detail.type_url.rsplit("/", 1)[-1] != _ERROR_INFO_TYPE:
                    continue
                info = rpc_pb2.ErrorInfo.FromString(detail.value)
                if info.domain == ERROR_DOMAIN:
                    return info
        except DecodeError:
            return None
    return None


def classify(error: grpc.RpcError) -> LeaseholdError:
    """The :class:`LeaseholdError` for a failed RPC.

    With a Leasehold ``ErrorInfo``: its reason, and retryable as the server said. Without
    one: a transport failure to connect (``UNAVAILABLE`` raised by the client library
    before anything was sent, recognised by grpc-core's message) is retryable; anything
    else (a handler's own error, a connection lost after the call was sent, a local
    deadline) is not, since the call may have run.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    message = details or str(error)
    trailers = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    )
    info = error_info(trailers)
    if info is not None:
        return LeaseholdError(
            code,
            message,
            reason=info.reason,
            retryable=info.metadata.get("retryable") == "true",
            metadata=info.metadata,
        )
    not_sent = code == grpc.StatusCode.UNAVAILABLE and message.lower().startswith(
        _NOT_SENT_PREFIXES
    )
    return LeaseholdError(code, message, retryable=not_sent, connect_failed=not_sent)
