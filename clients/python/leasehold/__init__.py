"""Python smart client for Leasehold.

Leasehold makes a keyed workload single-writer per key across instances. This client
watches the cluster's routing table and sends each call straight to its key's owner::

    from leasehold import Client

    with Client(["10.0.0.1:7070", "10.0.0.2:7070"]) as client:
        client.wait_for_table(timeout=5)
        result = client.call("account-1", b'{"amount": 5}')
        print(result.payload, result.owner)
"""

from .client import DEFAULT_CHANNEL_OPTIONS, CallResult, Client, Location, TlsConfig
from .errors import ERROR_DOMAIN, LeaseholdError, Reason, classify
from .hashing import HASH_VERSION, key_hash, shard_for_key
from .routing import Member, Route, Router, RoutingTable

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "ERROR_DOMAIN",
    "HASH_VERSION",
    "CallResult",
    "Client",
    "LeaseholdError",
    "Location",
    "Member",
    "Reason",
    "Route",
    "Router",
    "RoutingTable",
    "TlsConfig",
    "classify",
    "key_hash",
    "shard_for_key",
]

__version__ = "0.1.0"
