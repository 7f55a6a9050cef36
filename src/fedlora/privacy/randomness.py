"""Where a client's DP randomness comes from: a secret key that never leaves it, or the seed.

DP-SGD's guarantee rests on the noise (and on which examples each Poisson batch holds) being
unknown to the adversary. The adversary of fedlora (docs/privacy.md) knows the code, the config,
the run's seed and every message, and it includes the server, which on Flower *writes* the
config. So by default (`privacy.noise = "secret"`) every random draw a client's privacy depends
on comes from a stream cipher keyed by that client's own 256-bit key:

    key   = 32 bytes from the operating system's CSPRNG, made once, kept beside the ledger
    K_tag = HMAC-SHA256(key, "fedlora/" + purpose + "/" + tags)      one key per stream
    bytes = ChaCha20(K_tag, nonce 0)                                  read front to back

Each stream (say "noise" of round 3) is its own ChaCha20 key, so the key's owner alone can
regenerate any of them, and a stream is never reused for another purpose or round. Draws:

* uniform u ∈ [0, 1): 52 random bits as the mantissa of a float in [1, 2), minus 1;
* Gaussian: Box–Muller, z = sqrt(−2 ln(1 − u₁))·(cos 2πu₂, sin 2πu₂), in float64; the noise
  of one coordinate is (z₁ + z₂ + z₃ + z₄)/2 ~ N(0, 1), then scaled by σ·C. Summing 2n = 4
  draws is the defence of Holohan & Braghin, "Secure Random Sampling in Differential
  Privacy" (arXiv 2107.10138, §5.1) against the floating-point attacks on Gaussian samplers
  (there and in Jin et al., arXiv 2112.05307): a single Box–Muller draw takes few values
  near each float, and an observer can test which candidate gradient a released value is
  consistent with; the sum of four spreads over the whole grid (attack cost 2^159 instead of
  2^53). Opacus's `secure_mode` uses the same n = 2.

`privacy.noise = "seeded"` keeps the research mode: torch generators seeded from
(seed, purpose, client, round), bit-for-bit what fedlora drew before the secret mode existed,
for studies that must reproduce exactly. ε then holds only against parties who do not know
the seed (and a released config names it).

Dropout masks are not part of the DP argument; they follow the same mode (from the key, or
from the seed) so that a secret run reveals nothing about them either.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from fedlora.config import NOISE as NOISE_MODES  # declared once, with the option
from fedlora.errors import FedloraError
from fedlora.fsutil import atomic_write_bytes
from fedlora.seeding import derive_seed

KEY_BYTES = 32
CHUNK = 1 << 20  # coordinates per block of Gaussian noise: bounds the float64 scratch memory
_MANTISSA = 0x000FFFFFFFFFFFFF
_ONE = 0x3FF0000000000000  # the bits of 1.0 (float64)


class SecretKeyError(FedloraError):
    """A client's secret key is missing or unreadable while its ledger says it has released."""


class Stream(Protocol):
    """One stream of draws, read front to back: the same calls in the same order give the same
    values to whoever holds the stream's source."""

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> Tensor:
        """N(0, std²) noise of `shape`, as `dtype`, on the CPU."""

    def uniform(self, n: int) -> Tensor:
        """n draws from U[0, 1) (float64 or float32), on the CPU."""


class Randomness(Protocol):
    """A client's source of every random draw its privacy depends on."""

    mode: str

    def stream(self, purpose: str, *tags: object) -> Stream:
        """The stream for `purpose` (noise, sample, center) and `tags` (e.g. the round)."""

    def torch_seed(self, purpose: str, *tags: object) -> int:
        """A 63-bit seed for torch's own generator (dropout)."""


# ------------------------------------------------------------------------------ secret
class ChaChaStream:
    """A ChaCha20 keystream turned into uniforms and Gaussians (see the module docstring)."""

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        self._cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _words(self, n: int) -> Tensor:
        """n fresh 64-bit words of keystream (encrypting zeros gives the keystream itself)."""
        buf = bytearray(8 * n)
        if n:
            self._cipher.update_into(bytes(8 * n), buf)
        return torch.frombuffer(buf, dtype=torch.int64) if n else torch.zeros(0, dtype=torch.int64)

    def uniform(self, n: int) -> Tensor:
        """U[0, 1) on the grid k·2⁻⁵², from the low 52 bits of each word."""
        w = self._words(n)
        return w.bitwise_and_(_MANTISSA).bitwise_or_(_ONE).view(torch.float64).sub_(1.0)

    def standard_normal(self, n: int) -> Tensor:
        """n draws of (z₁ + z₂ + z₃ + z₄)/2, each z a Box–Muller Gaussian: N(0, 1) in float64."""
        if n == 0:
            return torch.zeros(0, dtype=torch.float64)
        u = self.uniform(4 * n).view(2, 2, n)  # [pair][u₁ or u₂][coordinate]
        radius = u[:, 0].neg_().log1p_().mul_(-2.0).sqrt_()  # sqrt(−2 ln(1 − u₁)) ∈ [0, 8.6]
        angle = u[:, 1].mul_(2.0 * math.pi)
        z = radius * angle.cos()
        z.addcmul_(radius, angle.sin_())  # per pair: z₁ + z₂ = r·cos θ + r·sin θ
        return z.sum(0).mul_(0.5)

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> Tensor:
        total = math.prod(shape)
        out = torch.empty(total, dtype=dtype)
        for start in range(0, total, CHUNK):
            stop = min(total, start + CHUNK)
            out[start:stop] = self.standard_normal(stop - start).mul_(std)
        return out.view(shape)


class SecretRandomness:
    """Every stream keyed by the client's secret (see the module docstring)."""

    mode = "secret"

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"a secret key is {KEY_BYTES} bytes")
        self._key = bytes(key)

    @classmethod
    def fresh(cls) -> "SecretRandomness":
        """A key that lives in memory only (a client with no state folder)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def _subkey(self, purpose: str, tags: tuple) -> bytes:
        label = "/".join(["fedlora", purpose, *map(str, tags)])
        return hmac.new(self._key, label.encode(), hashlib.sha256).digest()

    def stream(self, purpose: str, *tags: object) -> ChaChaStream:
        return ChaChaStream(self._subkey(purpose, tags))

    def torch_seed(self, purpose: str, *tags: object) -> int:
        return int.from_bytes(self._subkey(purpose, tags)[:8], "big") >> 1

    def __repr__(self) -> str:  # never print the key
        return "SecretRandomness(<key withheld>)"


# ------------------------------------------------------------------------------ seeded
class TorchStream:
    """A seeded torch generator: exactly the draws fedlora made before secret noise existed."""

    def __init__(self, seed: int):
        self._gen = torch.Generator().manual_seed(seed)

    @classmethod
    def of(cls, generator: torch.Generator | None) -> "TorchStream":
        """A stream over an existing generator (None: torch's global one)."""
        stream = cls.__new__(cls)
        stream._gen = generator if generator is not None else torch.default_generator
        return stream

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> Tensor:
        return torch.normal(0.0, std, size=shape, generator=self._gen, dtype=dtype)

    def uniform(self, n: int) -> Tensor:
        return torch.rand(n, generator=self._gen)


class SeededRandomness:
    """Streams from (seed, purpose, client, tags): anyone who knows the seed can regenerate them."""

    mode = "seeded"

    def __init__(self, seed: int, cid: int):
        self.seed, self.cid = seed, cid

    def stream(self, purpose: str, *tags: object) -> TorchStream:
        return TorchStream(derive_seed(self.seed, purpose, self.cid, *tags))

    def torch_seed(self, purpose: str, *tags: object) -> int:
        return derive_seed(self.seed, purpose, self.cid, *tags)


def randomness_for(mode: str, seed: int, cid: int) -> Randomness:
    """A client's randomness before any key file is attached: seeded, or a fresh in-memory key."""
    if mode == "seeded":
        return SeededRandomness(seed, cid)
    if mode == "secret":
        return SecretRandomness.fresh()
    raise ValueError(f"privacy.noise must be one of {NOISE_MODES}, got {mode!r}")


# ------------------------------------------------------------------------------ key files
def load_or_create_key(path: Path, released: bool) -> SecretRandomness:
    """The client's key from `path`, made (0600, atomically) on first use.

    `released`: the client's ledger already records a release. Its key must then exist: a
    client that started again with a fresh key could re-release rounds it already released
    with other noise, or its replays would no longer match what it sent. Refused instead.
    """
    if path.exists():
        try:
            key = bytes.fromhex(path.read_text(encoding="ascii").strip())
            if len(key) != KEY_BYTES:
                raise ValueError(f"it holds {len(key)} bytes, not {KEY_BYTES}")
        except (OSError, ValueError) as err:
            raise SecretKeyError(f"secret key '{path}' is unreadable ({err}) — restore it from the "
                            "site's backup; without it the site cannot continue its ledger") from None
        return SecretRandomness(key)
    if released:
        raise SecretKeyError(f"secret key '{path}' is missing but the ledger beside it records released "
                        "rounds — restore the key from the site's backup (starting again with a "
                        "fresh key is refused: it would release rounds twice with different noise)")
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, key.hex().encode("ascii"), mode=0o600)
    return SecretRandomness(key)
