"""Routing tables, and the choice of the instance a call is sent to."""

import itertools
import random
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .hashing import HASH_VERSION, shard_for_key

__all__ = ["Member", "Route", "Router", "RoutingTable"]


@dataclass(frozen=True)
class Member:
    """A member of the cluster, as a routing table names it."""

    id: str
    address: str
    """Client address (``host:port``)."""
    draining: bool = False
    """The member is leaving: its shards are moving away."""


@dataclass(frozen=True)
class RoutingTable:
    """An immutable snapshot of a ``leasehold.v1.RoutingTable``."""

    shard_count: int
    hash_version: int
    revision: int
    """etcd revision the table reflects."""
    members: tuple[Member, ...]
    owners: tuple[Optional[int], ...]
    """Per shard: the index of its owner in ``members``, or ``None`` when unowned."""
    epochs: tuple[int, ...]
    """Per shard: the owner's epoch (0 when unowned)."""
    _by_id: Mapping[str, Member] = field(init=False, repr=False, compare=False)
    _by_address: Mapping[str, Member] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {m.id: m for m in self.members})
        object.__setattr__(self, "_by_address", {m.address: m for m in self.members})

    @classmethod
    def from_proto(cls, message) -> "RoutingTable":
        """Decodes a ``leasehold.v1.RoutingTable`` message.

        Owner references outside ``members`` count as "no owner"; shards missing from
        ``owners`` or ``epochs`` as unowned and epoch 0.
        """
        members = tuple(
            Member(id=m.id, address=m.address, draining=m.draining) for m in message.members
        )
        shard_count = message.shard_count
        owners: list[Optional[int]] = []
        epochs: list[int] = []
        for shard in range(shard_count):
            ref = message.owners[shard] if shard < len(message.owners) else 0
            owners.append(ref - 1 if 0 < ref <= len(members) else None)
            epochs.append(message.epochs[shard] if shard < len(message.epochs) else 0)
        return cls(
            shard_count=shard_count,
            hash_version=message.hash_version,
            revision=message.revision,
            members=members,
            owners=tuple(owners),
            epochs=tuple(epochs),
        )

    @property
    def computes_shards(self) -> bool:
        """Whether this client can compute shards with the table's hash version."""
        return self.hash_version == HASH_VERSION and self.shard_count > 0

    @property
    def complete(self) -> bool:
        """True when every shard has an owner."""
        return self.shard_count > 0 and all(o is not None for o in self.owners)

    def shard_of(self, key) -> Optional[int]:
        """The key's shard, or ``None`` when the hash version is unknown to this client."""
        if not self.computes_shards:
            return None
        return shard_for_key(key, self.shard_count)

    def owner(self, shard: int) -> Optional[Member]:
        """The owner of ``shard``, or ``None`` when it has none (or is out of range)."""
        if not 0 <= shard < len(self.owners):
            return None
        index = self.owners[shard]
        return None if index is None else self.members[index]

    def epoch(self, shard: int) -> int:
        """The epoch of ``shard``'s owner (0 when unowned or out of range)."""
        return self.epochs[shard] if 0 <= shard < len(self.epochs) else 0

    def member(self, member_id: str) -> Optional[Member]:
        """The member with this id, if the table lists it."""
        return self._by_id.get(member_id)

    def member_at(self, address: str) -> Optional[Member]:
        """The member with this client address, if the table lists one."""
        return self._by_address.get(address)


@dataclass(frozen=True)
class Route:
    """Where one attempt of a call goes."""

    address: str
    member: Optional[str]
    """The id of the member at ``address`` when the routing table names it."""
    shard: Optional[int]
    """The key's shard when the client could compute it."""
    direct: bool
    """True when ``address`` is the shard's owner as far as the client knows."""


def _dedupe(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(a for a in addresses if a))


class Router:
    """The client's routing state: the latest routing table, owners learnt from answers
    since that table, and addresses that recently failed to connect. Thread-safe.

    Args:
        seeds: Addresses to use before (and besides) the members a table names.
        cooldown: Seconds an address that failed to connect is avoided for.
        clock: Monotonic clock (for tests).
    """

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        cooldown: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        self._seeds = _dedupe(seeds)
        if not self._seeds:
            raise ValueError("at least one seed address is needed")
        self._cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._table: Optional[RoutingTable] = None
        self._hints: dict[int, str] = {}
        self._down: dict[str, float] = {}
        self._round_robin = itertools.count(random.randrange(1 << 16))
        self._watch_turn = itertools.count(random.randrange(1 << 16))

    @property
    def seeds(self) -> list[str]:
        """The seed addresses."""
        return list(self._seeds)

    @property
    def table(self) -> Optional[RoutingTable]:
        """The latest routing table, or ``None`` before the first."""
        with self._lock:
            return self._table

    def offer(self, table: RoutingTable) -> bool:
        """Installs ``table``: the instance streaming it is the authority while the stream
        lasts (revisions may also go back, after an etcd restore). Returns True.
        Installing a table forgets the owners learnt from answers.
        """
        with self._changed:
            self._table = table
            self._hints.clear()
            self._changed.notify_all()
            return True

    def wait_for_table(self, timeout: Optional[float], *, complete: bool = False) -> bool:
        """Waits until there is a table (one where every shard has an owner when
        ``complete``) for at most ``timeout`` seconds (``None``: no limit)."""

        def ready() -> bool:
            return self._table is not None and (not complete or self._table.complete)

        with self._changed:
            return self._changed.wait_for(ready, timeout)

    def learn_owner(self, shard: int, owner: str) -> None:
        """Notes that ``owner`` owns ``shard`` (from an answer), preferred over the
        table's owner until the next table."""
        if not owner:
            return
        with self._lock:
            self._hints[shard] = owner

    def mark_unreachable(self, address: str) -> None:
        """Avoids ``address`` (when there is a choice) for the cooldown."""
        with self._lock:
            self._down[address] = self._clock() + self._cooldown

    def _is_down(self, address: str) -> bool:
        until = self._down.get(address)
        if until is None:
            return False
        if until <= self._clock():
            del self._down[address]
            return False
        return True

    def _candidates(self) -> tuple[list[str], list[str], list[str]]:
        """Addresses for "any instance": members that are not draining, seeds that are
        not members, and draining members."""
        members = self._table.members if self._table is not None else ()
        serving = _dedupe(m.address for m in members if not m.draining)
        draining = _dedupe(m.address for m in members if m.draining and m.address not in serving)
        seeds = [s for s in self._seeds if s not in serving and s not in draining]
        return serving, seeds, draining

    def addresses(self) -> list[str]:
        """Every address known: the table's members and the seeds."""
        with self._lock:
            return [a for group in self._candidates() for a in group]

    def _any(self, groups: Sequence[list[str]], avoid: Collection[str]) -> str:
        """Round robin over the first group with a usable address; usable means not in
        ``avoid`` and not recently unreachable, relaxed step by step when none is."""
        filters = (
            lambda a: a not in avoid and not self._is_down(a),
            lambda a: a not in avoid,
            lambda a: True,
        )
        for usable in filters:
            for group in groups:
                choice = [a for a in group if usable(a)]
                if choice:
                    return choice[next(self._round_robin) % len(choice)]
        raise AssertionError("the seeds are never empty")

    def route(self, key, avoid: Collection[str] = ()) -> Route:
        """Where to send a call for ``key``.

        The shard's owner (one learnt from an answer first, else the table's) unless it is
        in ``avoid`` or recently failed to connect; otherwise any instance, round robin,
        preferring members that are not draining and addresses not avoided.
        """
        with self._lock:
            table = self._table
            shard = table.shard_of(key) if table is not None else None
            owner = None
            if table is not None and shard is not None:
                hint = self._hints.get(shard)
                hinted = table.member(hint) if hint is not None else None
                for candidate in (hinted, table.owner(shard)):
                    if candidate is None:
                        continue
                    owner = owner or candidate
                    if candidate.address not in avoid and not self._is_down(candidate.address):
                        return Route(candidate.address, candidate.id, shard, direct=True)
            address = self._any(self._candidates(), avoid)
            member = table.member_at(address) if table is not None else None
            return Route(
                address,
                member.id if member is not None else None,
                shard,
                direct=owner is not None and member is not None and member.id == owner.id,
            )

    def watch_address(self) -> str:
        """The next address to watch the routing table from, in turn: members that are
        not draining and seeds (draining members only when nothing else is known),
        skipping addresses that recently failed to connect while others remain."""
        with self._lock:
            serving, seeds, draining = self._candidates()
            candidates = serving + seeds or draining
            up = [a for a in candidates if not self._is_down(a)] or candidates
            return up[next(self._watch_turn) % len(up)]
