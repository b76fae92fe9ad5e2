"""Routing tables: decoding, revision order and the choice of where a call goes."""

import unittest

from leasehold import Router, RoutingTable, shard_for_key
from leasehold._proto.leasehold.v1 import entities_pb2 as pb

SHARDS = 4


def table_message(revision=10, owners=(1, 2, 3, 1), hash_version=1, draining=()):
    """A table of three members a, b, c (addresses a:1, b:1, c:1); `owners` holds
    1 + member index per shard (0: unowned), epochs are 100 + shard when owned."""
    return pb.RoutingTable(
        shard_count=len(owners),
        hash_version=hash_version,
        revision=revision,
        members=[
            pb.RoutingMember(id=m, address=f"{m}:1", draining=m in draining)
            for m in ("a", "b", "c")
        ],
        owners=list(owners),
        epochs=[100 + s if o else 0 for s, o in enumerate(owners)],
    )


def table(**kwargs) -> RoutingTable:
    return RoutingTable.from_proto(table_message(**kwargs))


def key_in(shard: int, shard_count: int = SHARDS) -> str:
    """A key whose shard is `shard`."""
    return next(
        k for k in (f"key-{i}" for i in range(10_000)) if shard_for_key(k, shard_count) == shard
    )


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class DecodeTest(unittest.TestCase):
    def test_fields(self):
        t = table(owners=(1, 2, 0, 3))
        self.assertEqual((t.shard_count, t.hash_version, t.revision), (4, 1, 10))
        self.assertEqual([m.id for m in t.members], ["a", "b", "c"])
        self.assertEqual(t.owners, (0, 1, None, 2))
        self.assertEqual(t.epochs, (100, 101, 0, 103))
        self.assertEqual(t.owner(1).address, "b:1")
        self.assertIsNone(t.owner(2))
        self.assertIsNone(t.owner(7))
        self.assertEqual(t.epoch(3), 103)
        self.assertEqual(t.member("c").address, "c:1")
        self.assertEqual(t.member_at("a:1").id, "a")
        self.assertFalse(t.complete)
        self.assertTrue(table().complete)

    def test_wire_round_trip(self):
        message = pb.RoutingTable.FromString(table_message(draining=("b",)).SerializeToString())
        t = RoutingTable.from_proto(message)
        self.assertTrue(t.member("b").draining)
        self.assertFalse(t.member("a").draining)

    def test_bad_owner_references_and_short_lists_mean_unowned(self):
        message = pb.RoutingTable(
            shard_count=4,
            hash_version=1,
            revision=1,
            members=[pb.RoutingMember(id="a", address="a:1")],
            owners=[1, 9],
            epochs=[5],
        )
        t = RoutingTable.from_proto(message)
        self.assertEqual(t.owners, (0, None, None, None))
        self.assertEqual(t.epochs, (5, 0, 0, 0))

    def test_shard_of_follows_the_hash(self):
        t = table()
        for key in ("", "a", "account-1", "user:42"):
            self.assertEqual(t.shard_of(key), shard_for_key(key, SHARDS))

    def test_unknown_hash_version_computes_no_shard(self):
        t = table(hash_version=2)
        self.assertFalse(t.computes_shards)
        self.assertIsNone(t.shard_of("a"))

    def test_empty_table_computes_no_shard(self):
        t = RoutingTable.from_proto(pb.RoutingTable(hash_version=1, revision=1))
        self.assertIsNone(t.shard_of("a"))
        self.assertFalse(t.complete)


class RevisionTest(unittest.TestCase):
    def test_the_streaming_instance_is_the_authority(self):
        router = Router(["seed:1"])
        self.assertIsNone(router.table)
        self.assertTrue(router.offer(table(revision=10)))
        # A lower revision (an etcd restored from a backup) replaces the table too.
        self.assertTrue(router.offer(table(revision=9, owners=(2, 2, 2, 2))))
        self.assertEqual(router.table.revision, 9)
        self.assertEqual(router.table.owners, (1, 1, 1, 1))

    def test_equal_revision_is_taken(self):
        router = Router(["seed:1"])
        router.offer(table(revision=10))
        self.assertTrue(router.offer(table(revision=10, owners=(3, 3, 3, 3))))
        self.assertEqual(router.table.owners, (2, 2, 2, 2))

    def test_wait_for_table(self):
        router = Router(["seed:1"])
        self.assertFalse(router.wait_for_table(0.01))
        router.offer(table(owners=(1, 0, 1, 1)))
        self.assertTrue(router.wait_for_table(0.01))
        self.assertFalse(router.wait_for_table(0.01, complete=True))
        router.offer(table(revision=11))
        self.assertTrue(router.wait_for_table(0.01, complete=True))


class RouteTest(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.router = Router(["seed:1", "a:1"], clock=self.clock)

    def test_without_table_any_seed_in_turn(self):
        seen = {self.router.route("k").address for _ in range(4)}
        self.assertEqual(seen, {"seed:1", "a:1"})
        route = self.router.route("k")
        self.assertIsNone(route.member)
        self.assertIsNone(route.shard)
        self.assertFalse(route.direct)

    def test_owner_from_the_table(self):
        self.router.offer(table(owners=(1, 2, 3, 1)))
        for shard, owner in enumerate("abca"):
            route = self.router.route(key_in(shard))
            self.assertEqual(
                (route.address, route.member, route.shard, route.direct),
                (f"{owner}:1", owner, shard, True),
            )

    def test_draining_owner_still_gets_its_calls(self):
        self.router.offer(table(owners=(1, 2, 3, 1), draining=("a",)))
        self.assertEqual(self.router.route(key_in(0)).address, "a:1")

    def test_unowned_shard_goes_to_members_not_draining(self):
        self.router.offer(table(owners=(0, 2, 3, 1), draining=("c",)))
        seen = set()
        for _ in range(10):
            route = self.router.route(key_in(0))
            self.assertFalse(route.direct)
            self.assertEqual(route.shard, 0)
            seen.add((route.address, route.member))
        self.assertEqual(seen, {("a:1", "a"), ("b:1", "b")})

    def test_unknown_hash_version_goes_anywhere(self):
        self.router.offer(table(hash_version=2))
        routes = [self.router.route(key_in(1)) for _ in range(6)]
        self.assertEqual({r.address for r in routes}, {"a:1", "b:1", "c:1"})
        self.assertTrue(all(r.shard is None and not r.direct for r in routes))

    def test_owner_learnt_from_an_answer_until_the_next_table(self):
        self.router.offer(table(owners=(1, 2, 3, 1)))
        self.router.learn_owner(1, "c")
        self.assertEqual(self.router.route(key_in(1)).address, "c:1")
        self.assertEqual(self.router.route(key_in(2)).address, "c:1")
        self.assertEqual(self.router.route(key_in(0)).address, "a:1")
        self.router.offer(table(revision=11, owners=(1, 2, 3, 1)))
        self.assertEqual(self.router.route(key_in(1)).address, "b:1")

    def test_learnt_owner_missing_from_the_table_is_ignored(self):
        self.router.offer(table(owners=(1, 2, 3, 1)))
        self.router.learn_owner(1, "z")
        self.assertEqual(self.router.route(key_in(1)).address, "b:1")

    def test_avoided_owner_sends_elsewhere(self):
        self.router.offer(table(owners=(1, 2, 3, 1)))
        for _ in range(5):
            route = self.router.route(key_in(1), avoid={"b:1"})
            self.assertIn(route.address, {"a:1", "c:1"})
            self.assertFalse(route.direct)

    def test_unreachable_address_avoided_for_the_cooldown(self):
        self.router.offer(table(owners=(1, 2, 3, 1)))
        self.router.mark_unreachable("b:1")
        self.assertNotEqual(self.router.route(key_in(1)).address, "b:1")
        self.clock.now += 2
        self.assertEqual(self.router.route(key_in(1)).address, "b:1")

    def test_everything_avoided_still_routes(self):
        router = Router(["x:1"])
        self.assertEqual(router.route("k", avoid={"x:1"}).address, "x:1")

    def test_addresses_and_watch_rotation(self):
        self.assertEqual(self.router.addresses(), ["seed:1", "a:1"])
        self.router.offer(table(draining=("c",)))
        self.assertEqual(self.router.addresses(), ["a:1", "b:1", "seed:1", "c:1"])
        watched = {self.router.watch_address() for _ in range(6)}
        self.assertEqual(watched, {"a:1", "b:1", "seed:1"})
        self.router.mark_unreachable("b:1")
        watched = {self.router.watch_address() for _ in range(6)}
        self.assertEqual(watched, {"a:1", "seed:1"})

    def test_seeds_are_needed(self):
        with self.assertRaises(ValueError):
            Router([])


if __name__ == "__main__":
    unittest.main()
