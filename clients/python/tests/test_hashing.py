"""The key-to-shard hash matches the servers' published test vectors."""

import unittest

from leasehold import HASH_VERSION, key_hash, shard_for_key

# From crates/types/src/lib.rs (`VECTORS`): key, hash, shard of 1024.
VECTORS = [
    ("", 0xEFD0_1F60_BA99_2926, 294),
    ("a", 0x82A2_A958_A9BE_CE5B, 603),
    ("account-1", 0x4EA9_6E94_7D43_B847, 71),
    ("user:42", 0x9988_17BE_E671_8248, 584),
    ("ключ", 0x5905_20D7_1827_5ED5, 725),
]


class HashTest(unittest.TestCase):
    def test_version(self):
        self.assertEqual(HASH_VERSION, 1)

    def test_published_vectors(self):
        for key, hash_, shard in VECTORS:
            with self.subTest(key=key):
                self.assertEqual(key_hash(key), hash_)
                self.assertEqual(shard_for_key(key, 1024), shard)

    def test_bytes_hash_like_their_utf8_string(self):
        for key, hash_, _ in VECTORS:
            self.assertEqual(key_hash(key.encode("utf-8")), hash_)
            self.assertEqual(key_hash(bytearray(key.encode("utf-8"))), hash_)

    def test_keys_spread_evenly(self):
        shards = 64
        counts = [0] * shards
        for i in range(64_000):
            counts[shard_for_key(f"key-{i}", shards)] += 1
        self.assertGreater(min(counts), 850)
        self.assertLess(max(counts), 1150)

    def test_shard_count_must_be_positive(self):
        with self.assertRaises(ValueError):
            shard_for_key("a", 0)


if __name__ == "__main__":
    unittest.main()
