"""The secret DP randomness: the right distribution, independent streams, keys kept safe.

References: the Gaussian's moments and tail masses (hand-computed), Python's own `random` and
`statistics` for nothing but the test's bookkeeping, RFC 8439's ChaCha20 keystream (so the
stream is the cipher, not something that looks like it), and the seeded mode's draws before
the secret mode existed (torch generators seeded by `derive_seed`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import stat

import pytest
import torch

from fedlora.privacy.dpsgd import clip_and_noise, gaussian_noise
from fedlora.privacy.randomness import (KEY_BYTES, ChaChaStream, SecretKeyError, SecretRandomness,
                                        SeededRandomness, load_or_create_key)
from fedlora.seeding import derive_seed

KEY = bytes(range(KEY_BYTES))


def test_the_stream_is_chacha20_of_rfc_8439():
    """RFC 8439 §2.4.2's test vector, reached through a 16-byte counter‖nonce of our own: with
    key 00..1f, counter 1 and nonce 000000000000004a00000000, the keystream begins 224f51f3...
    Our streams use counter 0 and nonce 0, so the check runs the cipher with the RFC's nonce."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    enc = Cipher(algorithms.ChaCha20(KEY, nonce), mode=None).encryptor()
    assert enc.update(bytes(16)).hex() == "224f51f3401bd9e12fde276fb8631ded"
    # and our stream is the same cipher: keystream = encryption of zeros
    ours = ChaChaStream(KEY)._words(4).numpy().tobytes()
    ref = Cipher(algorithms.ChaCha20(KEY, bytes(16)), mode=None).encryptor().update(bytes(32))
    assert ours == ref


def test_each_stream_has_its_own_hmac_key():
    rnd = SecretRandomness(KEY)
    sub = hmac.new(KEY, b"fedlora/noise/3", hashlib.sha256).digest()
    assert torch.equal(rnd.stream("noise", 3).uniform(64), ChaChaStream(sub).uniform(64))


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_secret_gaussian_has_mean_zero_and_the_asked_std(std):
    n = 400_000
    z = SecretRandomness(KEY).stream("noise", 0).normal((n,), std, torch.float64) / std
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.std()) - 1) < 5 * se  # sd of the sample sd ≈ 1/sqrt(2n) < 1/sqrt(n)
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis of N(0, 1)
    # tail masses: P(|z| > 1) = 0.3173, P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027
    for k, p in ((1, 0.31731), (2, 0.04550), (3, 0.00270)):
        got = float((z.abs() > k).double().mean())
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n), k


def test_secret_uniform_is_uniform_and_on_the_52_bit_grid():
    u = SecretRandomness(KEY).stream("sample", 0).uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 2 ** 52, torch.floor(u * 2 ** 52))
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = len(u) / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # χ²(9) upper 0.1% point


def test_streams_are_independent_between_steps_rounds_and_parameters():
    """Correlations between consecutive blocks of one stream (steps), between rounds and between
    parameters are all within 5/sqrt(n) of 0; identical streams would give 1."""
    rnd, n = SecretRandomness(KEY), 100_000
    shapes = {"a": (n,), "b": (n,)}
    step1 = gaussian_noise(shapes, 1.0, rnd.stream("noise", 0))
    step2 = gaussian_noise(shapes, 1.0, rnd.stream("noise", 0))  # the same stream again
    assert torch.equal(step1["a"], step2["a"])  # the key's owner regenerates it exactly
    stream = rnd.stream("noise", 0)
    first, second = gaussian_noise(shapes, 1.0, stream), gaussian_noise(shapes, 1.0, stream)
    other_round = gaussian_noise(shapes, 1.0, rnd.stream("noise", 1))
    other_key = gaussian_noise(shapes, 1.0, SecretRandomness(bytes(KEY_BYTES)).stream("noise", 0))
    corr = lambda x, y: float(torch.corrcoef(torch.stack([x, y]))[0, 1])  # noqa: E731
    for x, y in ((first["a"], first["b"]), (first["a"], second["a"]),
                 (first["a"], other_round["a"]), (first["a"], other_key["a"])):
        assert abs(corr(x, y)) < 5 / math.sqrt(n)


def test_noise_on_the_dp_sum_has_std_sigma_times_clip():
    """clip_and_noise of an empty batch is pure noise: N(0, (σC)²)/B per coordinate."""
    sigma, clip, batch, n = 1.7, 0.5, 4.0, 200_000
    empty = {"w": torch.zeros(0, n)}
    out, _ = clip_and_noise(empty, clip=clip, noise_multiplier=sigma, expected_batch_size=batch,
                            generator=SecretRandomness(KEY).stream("noise", 0))
    scaled = out["w"].double() * batch / (sigma * clip)
    assert abs(float(scaled.mean())) < 5 / math.sqrt(n)
    assert abs(float(scaled.std()) - 1) < 5 / math.sqrt(n)


def test_seeded_mode_draws_what_fedlora_drew_before():
    """Bit for bit the old derivation: torch generators seeded by derive_seed(seed, tag, client,
    round), noise with torch.normal one parameter at a time in sorted name order."""
    rnd = SeededRandomness(7, 2)
    gen = torch.Generator().manual_seed(derive_seed(7, "noise", 2, 4))
    want = {k: torch.normal(0.0, 0.3, size=(3, 5), generator=gen) for k in ("a", "b")}
    got = gaussian_noise({"b": (3, 5), "a": (3, 5)}, 0.3, rnd.stream("noise", 4))
    assert all(torch.equal(got[k], want[k]) for k in want)
    gen = torch.Generator().manual_seed(derive_seed(7, "sample", 2, 4))
    assert torch.equal(rnd.stream("sample", 4).uniform(10), torch.rand(10, generator=gen))
    assert rnd.torch_seed("dropout", 4) == derive_seed(7, "dropout", 2, 4)


def test_a_key_file_is_made_once_private_and_kept(tmp_path):
    path = tmp_path / "ledger" / "client-0.key"
    first = load_or_create_key(path, released=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key(path, released=True)
    assert torch.equal(first.stream("noise", 0).uniform(8), again.stream("noise", 0).uniform(8))
    assert "key" not in repr(first).replace("<key withheld>", "")  # never printed
    other = load_or_create_key(tmp_path / "other.key", released=False)
    assert not torch.equal(first.stream("noise", 0).uniform(8), other.stream("noise", 0).uniform(8))


def test_a_missing_key_beside_a_released_ledger_is_refused(tmp_path):
    with pytest.raises(SecretKeyError, match="missing but the ledger"):
        load_or_create_key(tmp_path / "client-0.key", released=True)
    assert not (tmp_path / "client-0.key").exists()  # no fresh key was made


@pytest.mark.parametrize("content", ["", "zz", "00" * 31])
def test_an_unreadable_key_is_refused(tmp_path, content):
    path = tmp_path / "client-0.key"
    path.write_text(content)
    with pytest.raises(SecretKeyError, match="unreadable"):
        load_or_create_key(path, released=False)
