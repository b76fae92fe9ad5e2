"""The key-to-shard hash, identical to the servers' (``hash_version`` 1).

FNV-1a 64 over the key's UTF-8 bytes, then the MurmurHash3 ``fmix64`` finaliser; a key's
shard is ``key_hash(key) % shard_count``.
"""

from typing import Union

__all__ = ["HASH_VERSION", "key_hash", "shard_for_key"]

HASH_VERSION = 1
"""The ``RoutingTable.hash_version`` this module implements."""

_MASK = 0xFFFF_FFFF_FFFF_FFFF
_FNV_OFFSET = 0xCBF2_9CE4_8422_2325
_FNV_PRIME = 0x0000_0100_0000_01B3


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51_AFD7_ED55_8CCD) & _MASK
    k ^= k >> 33
    k = (k * 0xC4CE_B9FE_1A85_EC53) & _MASK
    k ^= k >> 33
    return k


def key_hash(key: Union[str, bytes]) -> int:
    """The stable 64-bit hash of a key (a ``str`` is hashed as its UTF-8 bytes)."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    return _fmix64(h)


def shard_for_key(key: Union[str, bytes], shard_count: int) -> int:
    """The shard of a key: ``key_hash(key) % shard_count``.

    Raises:
        ValueError: if ``shard_count`` is not positive.
    """
    if shard_count <= 0:
        raise ValueError(f"shard_count must be positive, not {shard_count}")
    return key_hash(key) % shard_count
