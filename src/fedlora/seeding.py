"""Seeds derived from the run's seed, so each random stream is fixed and independent."""

import hashlib


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed from `seed` and tags, e.g. derive_seed(0, "noise", client, round)."""
    text = ":".join([str(seed), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
