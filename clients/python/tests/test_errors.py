"""Classifying failed RPCs from their status and `grpc-status-details-bin` trailer."""

import unittest

import grpc

from leasehold import ERROR_DOMAIN, LeaseholdError, Reason, classify
from leasehold.errors import error_info


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: a varint for an int, length-delimited otherwise."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def error_info_bytes(reason: str, domain: str, metadata: dict) -> bytes:
    """A google.rpc.ErrorInfo, encoded by hand."""
    entries = b"".join(_field(3, _field(1, k) + _field(2, v)) for k, v in metadata.items())
    return _field(1, reason) + _field(2, domain) + entries


def status_bytes(code: int, message: str, details) -> bytes:
    """A google.rpc.Status whose details are (type URL, bytes) pairs."""
    packed = b"".join(_field(3, _field(1, url) + _field(2, value)) for url, value in details)
    return _field(1, code) + _field(2, message) + packed


def leasehold_trailer(code, reason, retryable, **extra):
    info = error_info_bytes(reason, ERROR_DOMAIN, {"retryable": retryable, **extra})
    return (
        (
            "grpc-status-details-bin",
            status_bytes(code.value[0], "m", [("type.googleapis.com/google.rpc.ErrorInfo", info)]),
        ),
    )


class FakeRpcError(grpc.RpcError):
    """What grpcio raises, reduced to the methods the client reads."""

    def __init__(self, code, details, trailers=()):
        super().__init__(details)
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


S = grpc.StatusCode


class ClassifyTest(unittest.TestCase):
    def test_every_reason(self):
        cases = [
            (S.INVALID_ARGUMENT, Reason.INVALID_CALL, "false"),
            (S.RESOURCE_EXHAUSTED, Reason.OVERLOADED, "true"),
            (S.UNAVAILABLE, Reason.NO_OWNER_AVAILABLE, "true"),
            (S.DEADLINE_EXCEEDED, Reason.HANDLER_TIMEOUT, "false"),
            (S.DEADLINE_EXCEEDED, Reason.DEADLINE_BEFORE_HANDLER, "true"),
            (S.DEADLINE_EXCEEDED, Reason.OUTCOME_UNKNOWN, "false"),
            (S.FAILED_PRECONDITION, Reason.NOT_OWNER, "true"),
            (S.ABORTED, Reason.FENCED, "false"),
        ]
        for code, reason, retryable in cases:
            with self.subTest(reason=reason):
                error = classify(
                    FakeRpcError(code, "why", leasehold_trailer(code, reason, retryable))
                )
                self.assertIsInstance(error, LeaseholdError)
                self.assertEqual(error.code, code)
                self.assertEqual(error.reason, reason)
                self.assertEqual(error.retryable, retryable == "true")
                self.assertEqual(error.message, "why")
                self.assertFalse(error.connect_failed)

    def test_not_owner_metadata(self):
        trailer = leasehold_trailer(
            S.FAILED_PRECONDITION, "NOT_OWNER", "true", shard="3", owner="b", epoch="9"
        )
        error = classify(FakeRpcError(S.FAILED_PRECONDITION, "not owner", trailer))
        self.assertEqual(
            error.metadata, {"retryable": "true", "shard": "3", "owner": "b", "epoch": "9"}
        )

    def test_handler_error_passes_through(self):
        error = classify(FakeRpcError(S.ALREADY_EXISTS, "dup"))
        self.assertEqual((error.code, error.message), (S.ALREADY_EXISTS, "dup"))
        self.assertIsNone(error.reason)
        self.assertFalse(error.retryable)

    def test_other_domains_do_not_count(self):
        info = error_info_bytes("NOT_OWNER", "example.com", {"retryable": "true"})
        trailer = (
            (
                "grpc-status-details-bin",
                status_bytes(9, "x", [("type.googleapis.com/google.rpc.ErrorInfo", info)]),
            ),
        )
        error = classify(FakeRpcError(S.FAILED_PRECONDITION, "x", trailer))
        self.assertIsNone(error.reason)
        self.assertFalse(error.retryable)

    def test_error_info_found_among_other_details(self):
        info = error_info_bytes("OVERLOADED", ERROR_DOMAIN, {"retryable": "true"})
        details = [
            ("type.googleapis.com/google.rpc.RetryInfo", _field(1, b"")),
            ("type.googleapis.com/google.rpc.ErrorInfo", info),
        ]
        trailer = (("other", "x"), ("grpc-status-details-bin", status_bytes(8, "m", details)))
        self.assertEqual(error_info(trailer).reason, "OVERLOADED")

    def test_undecodable_details_are_ignored(self):
        trailer = (("grpc-status-details-bin", b"\xff\xff\xff"),)
        self.assertIsNone(error_info(trailer))
        error = classify(FakeRpcError(S.INTERNAL, "boom", trailer))
        self.assertEqual((error.reason, error.retryable), (None, False))

    def test_failure_to_connect_is_retryable(self):
        error = classify(
            FakeRpcError(
                S.UNAVAILABLE,
                "failed to connect to all addresses; last error: UNKNOWN: "
                "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
            )
        )
        self.assertTrue(error.retryable)
        self.assertTrue(error.connect_failed)
        self.assertIsNone(error.reason)

    def test_dns_failure_is_retryable(self):
        for details in (
            "DNS resolution failed for nowhere:1: C-ares status is not ARES_SUCCESS",
            "errors resolving nowhere:1: [field:hostname lookup error:Domain name not found]",
        ):
            with self.subTest(details=details):
                self.assertTrue(classify(FakeRpcError(S.UNAVAILABLE, details)).connect_failed)

    def test_lost_connection_may_have_run(self):
        for details in ("Socket closed", "recvmsg:Connection reset by peer", "GOAWAY received"):
            with self.subTest(details=details):
                error = classify(FakeRpcError(S.UNAVAILABLE, details))
                self.assertFalse(error.retryable)

    def test_unavailable_from_a_handler_is_not_a_connect_failure(self):
        error = classify(
            FakeRpcError(S.UNAVAILABLE, "database: failed to connect to all addresses")
        )
        self.assertFalse(error.retryable)

    def test_local_deadline_may_have_run(self):
        error = classify(FakeRpcError(S.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        self.assertEqual((error.reason, error.retryable), (None, False))

    def test_str(self):
        error = LeaseholdError(
            S.UNAVAILABLE, "no owner", reason="NO_OWNER_AVAILABLE", retryable=True
        )
        self.assertEqual(str(error), "UNAVAILABLE [NO_OWNER_AVAILABLE]: no owner")
        self.assertEqual(str(LeaseholdError(S.INTERNAL, "boom")), "INTERNAL: boom")


if __name__ == "__main__":
    unittest.main()
