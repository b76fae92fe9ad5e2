"""The client against in-process fake instances (plain gRPC servers on 127.0.0.1 that
answer like a cluster whose ownership the test controls)."""

import os
import threading
import time
import unittest
from concurrent import futures

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from leasehold import Client, LeaseholdError, Reason, shard_for_key
from leasehold._proto.leasehold.client import rpc_pb2
from leasehold._proto.leasehold.v1 import entities_pb2 as pb
from leasehold._proto.leasehold.v1 import entities_pb2_grpc

SHARDS = 8


def key_in(shard: int) -> str:
    return next(k for k in (f"key-{i}" for i in range(10_000)) if shard_for_key(k, SHARDS) == shard)


def leasehold_failure(code, reason, retryable, **metadata):
    """A failure for `FakeCluster.failures`: Leasehold's error with its ErrorInfo."""
    return lambda context: leasehold_abort(context, code, reason, retryable, **metadata)


def leasehold_abort(context, code, reason, retryable, **metadata):
    info = rpc_pb2.ErrorInfo(
        reason=reason, domain="leasehold.dev", metadata={"retryable": retryable, **metadata}
    )
    status = rpc_pb2.Status(code=code.value[0], message=reason)
    status.details.add(
        type_url="type.googleapis.com/google.rpc.ErrorInfo", value=info.SerializeToString()
    )
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(code, reason.lower())


class FakeCluster:
    """Members m0..m{n-1}. `owners` is the truth (who runs a shard's calls); `published`
    is what the routing streams send (the test publishes when it wants)."""

    def __init__(self, n=3):
        self.changed = threading.Condition()
        self.hash_version = 1
        self.revision = 1
        self.owners = [f"m{s % n}" for s in range(SHARDS)]
        self.published = list(self.owners)
        self.received = []
        self.metadata = {}
        self.failures = {}
        self.instances = [FakeInstance(self, f"m{i}") for i in range(n)]
        self.addresses = {i.id: i.address for i in self.instances}

    def publish(self, owners=None, revision=None):
        with self.changed:
            self.published = list(owners or self.owners)
            self.revision = self.revision + 1 if revision is None else revision
            self.changed.notify_all()

    def table(self):
        ids = sorted(self.addresses)
        return pb.RoutingTable(
            shard_count=SHARDS,
            hash_version=self.hash_version,
            revision=self.revision,
            members=[pb.RoutingMember(id=m, address=self.addresses[m]) for m in ids],
            owners=[ids.index(o) + 1 for o in self.published],
            epochs=[10 + s for s in range(SHARDS)],
        )

    def stop(self):
        for instance in self.instances:
            instance.stop()


class FakeInstance(entities_pb2_grpc.EntitiesServicer):
    def __init__(self, cluster, member_id):
        self.cluster = cluster
        self.id = member_id
        self.stopped = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        entities_pb2_grpc.add_EntitiesServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self):
        self.stopped.set()
        with self.cluster.changed:
            self.cluster.changed.notify_all()
        self.server.stop(grace=None).wait()

    def Call(self, request, context):
        shard = shard_for_key(request.key, SHARDS)
        self.cluster.received.append((self.id, request.key))
        self.cluster.metadata = dict(context.invocation_metadata())
        failures = self.cluster.failures.get(request.key)
        if failures:
            failures.pop(0)(context)
        return pb.CallResponse(
            payload=b"echo:" + request.payload,
            shard=shard,
            epoch=10 + shard,
            owner=self.cluster.owners[shard],
        )

    def Locate(self, request, context):
        shard = shard_for_key(request.key, SHARDS)
        owner = self.cluster.owners[shard]
        return pb.LocateResponse(
            shard=shard, owner=owner, address=self.cluster.addresses[owner], epoch=10 + shard
        )

    def WatchRouting(self, request, context):
        cluster = self.cluster
        sent = [None]

        def news():
            return cluster.revision != sent[0] or self.stopped.is_set()

        while context.is_active() and not self.stopped.is_set():
            with cluster.changed:
                if not cluster.changed.wait_for(news, timeout=0.1) or self.stopped.is_set():
                    continue
                sent[0] = cluster.revision
                table = cluster.table()
            yield table


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.cluster = FakeCluster()
        self.client = Client([self.cluster.instances[0].address], default_timeout=5)
        self.assertTrue(self.client.wait_for_table(5))

    def tearDown(self):
        self.client.close()
        self.cluster.stop()

    def wait_for_revision(self, revision):
        deadline = time.monotonic() + 5
        while self.client.routing().revision != revision:
            self.assertLess(time.monotonic(), deadline, "table not received")
            time.sleep(0.01)

    def test_calls_go_straight_to_the_owner(self):
        for shard in range(SHARDS):
            result = self.client.call(key_in(shard), b"p")
            self.assertEqual(result.payload, b"echo:p")
            self.assertEqual((result.shard, result.epoch), (shard, 10 + shard))
            self.assertEqual(result.owner, f"m{shard % 3}")
            self.assertFalse(result.forwarded)
        self.assertEqual(self.cluster.received, [(f"m{s % 3}", key_in(s)) for s in range(SHARDS)])

    def test_forwarded_answer_teaches_the_owner_until_the_next_table(self):
        key = key_in(0)
        self.cluster.owners[0] = "m2"
        first = self.client.call(key, b"1")
        self.assertEqual((first.owner, first.forwarded), ("m2", True))
        second = self.client.call(key, b"2")
        self.assertEqual((second.owner, second.forwarded), ("m2", False))
        self.assertEqual([m for m, _ in self.cluster.received], ["m0", "m2"])
        self.cluster.publish(self.cluster.owners)
        self.wait_for_revision(2)
        self.assertFalse(self.client.call(key, b"3").forwarded)

    def test_a_lower_revision_from_the_stream_replaces_the_table(self):
        self.cluster.publish(revision=5)
        self.wait_for_revision(5)
        self.cluster.publish(owners=["m1"] * SHARDS, revision=4)
        self.wait_for_revision(4)
        self.assertEqual(self.client.locate(key_in(0)).owner, "m1")

    def test_retryable_failures_are_retried(self):
        key = key_in(1)
        overloaded = leasehold_failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", "true")
        self.cluster.failures[key] = [overloaded, overloaded]
        result = self.client.call(key, b"x")
        self.assertEqual(result.owner, "m1")
        self.assertEqual(self.cluster.received, [("m1", key)] * 3)

    def test_not_owner_names_the_owner_to_try(self):
        key = key_in(1)
        self.cluster.owners[1] = "m2"
        not_owner = leasehold_failure(
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOT_OWNER",
            "true",
            shard="1",
            owner="m2",
            epoch="50",
        )
        self.cluster.failures[key] = [not_owner]
        result = self.client.call(key, b"x")
        self.assertEqual((result.owner, result.forwarded), ("m2", False))
        self.assertEqual(self.cluster.received, [("m1", key), ("m2", key)])

    def test_failures_that_may_have_run_are_not_retried(self):
        key = key_in(2)
        timeout = leasehold_failure(grpc.StatusCode.DEADLINE_EXCEEDED, "HANDLER_TIMEOUT", "false")

        def handler(context):
            context.abort(grpc.StatusCode.UNAVAILABLE, "cannot reach the database")

        for failure, reason in ((timeout, Reason.HANDLER_TIMEOUT), (handler, None)):
            self.cluster.received.clear()
            self.cluster.failures[key] = [failure]
            with self.assertRaises(LeaseholdError) as caught:
                self.client.call(key, b"x")
            self.assertEqual(caught.exception.reason, reason)
            self.assertFalse(caught.exception.retryable)
            self.assertEqual(len(self.cluster.received), 1)

    def test_retryable_failures_until_the_deadline(self):
        key = key_in(3)
        no_owner = leasehold_failure(grpc.StatusCode.UNAVAILABLE, "NO_OWNER_AVAILABLE", "true")
        self.cluster.failures[key] = [no_owner] * 1000
        started = time.monotonic()
        with self.assertRaises(LeaseholdError) as caught:
            self.client.call(key, b"x", timeout=0.5)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(caught.exception.reason, Reason.NO_OWNER_AVAILABLE)
        self.assertTrue(caught.exception.retryable)
        self.assertGreater(len(self.cluster.received), 2)

    def test_owner_that_cannot_be_reached_is_bypassed(self):
        self.cluster.instances[1].stop()
        self.cluster.owners[1] = "m0"
        self.assertEqual(self.client.call(key_in(1), b"x").owner, "m0")
        again = self.client.call(key_in(1), b"x")
        self.assertEqual((again.owner, again.forwarded), ("m0", False))

    def test_watch_moves_to_another_instance(self):
        self.cluster.instances[0].stop()
        self.cluster.publish(owners=["m2"] * SHARDS)
        self.wait_for_revision(2)
        self.assertEqual(self.client.locate(key_in(0)).owner, "m2")

    def test_unknown_hash_version_calls_any_instance(self):
        self.cluster.hash_version = 2
        self.cluster.publish()
        self.wait_for_revision(2)
        for _ in range(6):
            self.client.call(key_in(0), b"x")
        self.assertEqual({m for m, _ in self.cluster.received}, {"m0", "m1", "m2"})
        location = self.client.locate(key_in(0))
        self.assertEqual((location.shard, location.owner), (0, "m0"))

    def test_locate_from_the_table(self):
        location = self.client.locate(key_in(4))
        self.assertEqual(
            (location.shard, location.owner, location.address, location.epoch),
            (4, "m1", self.cluster.addresses["m1"], 14),
        )

    def test_metadata_reaches_the_server(self):
        self.client.call("k", b"x", metadata={"x-request": "1"})
        self.assertEqual(self.cluster.metadata.get("x-request"), "1")
        self.client.call("k", b"x", metadata=[("x-request", "2")])
        self.assertEqual(self.cluster.metadata.get("x-request"), "2")

    def test_no_time_left(self):
        with self.assertRaises(LeaseholdError) as caught:
            self.client.call("k", b"x", timeout=0)
        error = caught.exception
        self.assertEqual(error.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertTrue(error.retryable)
        self.assertFalse(error.connect_failed)
        self.assertEqual(self.cluster.received, [])

    def test_close(self):
        self.client.close()
        self.client.close()
        with self.assertRaises(LeaseholdError) as caught:
            self.client.call("k", b"x")
        self.assertEqual(caught.exception.code, grpc.StatusCode.CANCELLED)


class WithoutTableTest(unittest.TestCase):
    def test_calls_and_locate_without_watching(self):
        cluster = FakeCluster(n=2)
        try:
            dead = "127.0.0.1:1"
            with Client([dead] + [i.address for i in cluster.instances], watch=False) as client:
                self.assertIsNone(client.routing())
                for _ in range(4):
                    result = client.call(key_in(0), b"x")
                    self.assertEqual(result.owner, "m0")
                    # Without a table the client cannot tell which member it reached.
                    self.assertFalse(result.forwarded)
                location = client.locate(key_in(1))
                self.assertEqual(
                    (location.owner, location.address), ("m1", cluster.addresses["m1"])
                )
        finally:
            cluster.stop()

    def test_nothing_reachable(self):
        with Client(["127.0.0.1:1"], watch=False) as client:
            with self.assertRaises(LeaseholdError) as caught:
                client.call("k", b"x", timeout=0.3)
            self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)
            self.assertTrue(caught.exception.connect_failed)


if __name__ == "__main__":
    unittest.main()
