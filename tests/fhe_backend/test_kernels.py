"""The client's fused kernels against plain integer arithmetic, at the edges their tricks must hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cipherswarm.fhe_backend import ParameterError, PlainWeights, get_backend, kernels, ring
from cipherswarm.fhe_backend.params import Params
from cipherswarm.fhe_backend.ring import NegacyclicFFT


def negacyclic(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Schoolbook a * s mod X^n + 1 over Python ints (the reference)."""
    n = len(a)
    out = [0] * n
    for i, ai in enumerate(a.tolist()):
        for j, sj in enumerate(s.tolist()):
            k = i + j
            if k < n:
                out[k] += ai * sj
            else:
                out[k - n] -= ai * sj
    return np.array(out, dtype=object)


@pytest.mark.parametrize("log_q", [20, 46, 64])
def test_encryption_product_is_exact(log_q: int) -> None:
    """fold -> FFT -> product -> inverse -> finish gives a*s + delta*m + e mod q exactly."""
    rng = np.random.default_rng(log_q)
    n, rows, delta = 64, 3, 12345
    ring = NegacyclicFFT(n)
    s = rng.integers(-1, 2, n)
    words = rng.integers(-(2**63), 2**63 - 1, (rows, n), dtype=np.int64)
    msg = rng.integers(-128, 128, (rows, n), dtype=np.int64)
    rand = np.zeros((rows, n), dtype=np.uint64)  # e = 0: the product itself is what is checked
    s_eval = ring.evaluate(s[None].astype(np.int64), 64, 32)[0]
    f = ring.products(words, log_q, s_eval).view(np.float64)
    out = np.empty((rows, n), dtype=np.int64)
    kernels.finish_encrypt(f, ring.untwist_re, ring.untwist_im, 26, log_q, delta, msg, rand, out)
    q = 1 << log_q
    for i in range(rows):
        a = np.array([(int(v) % q + q // 2) % q - q // 2 for v in words[i].tolist()], dtype=object)  # centred
        want = [(int(c) + delta * int(m)) % q for c, m in zip(negacyclic(a, s), msg[i].tolist())]
        assert [int(v) % q for v in out[i].tolist()] == want


def test_noise_is_centred_binomial_of_the_48_low_bits() -> None:
    bits = np.array([0, (1 << 24) - 1, (1 << 48) - (1 << 24), 0xFFFF_0000_0000_0000, 0b1011 | (0b11 << 24)], dtype=np.uint64)
    n = 2 * len(bits)
    f, untwist = np.zeros((1, 1, n)), np.zeros(n // 2)  # a*s = 0
    out = np.empty((1, n), dtype=np.int64)
    rand = np.concatenate([bits, bits])[None]
    kernels.finish_encrypt(f, untwist, untwist, 26, 64, 1, np.zeros_like(out), rand, out)
    assert out[0, : len(bits)].tolist() == [0, 24, -24, 0, 3 - 2]


@pytest.mark.parametrize("log_q, drop", [(40, 1), (54, 7), (64, 16)])
def test_a_rounded_upload_is_floor_of_b_plus_the_dither_of_the_top_16_bits(log_q: int, drop: int) -> None:
    """out = floor((b + u) / 2^drop) mod 2^(log_q - drop), u the top 16 bits of the noise word mod 2^drop,
    b = delta * m + e mod 2^log_q (a*s = 0): checked over Python ints, at the words' extremes too."""
    rng = np.random.default_rng(drop)
    n = 64
    q, kept = 1 << log_q, 1 << (log_q - drop)
    delta = q // 300 + 1  # delta * m spans q, so words near 0 and near q occur
    msg = rng.integers(-128, 128, (1, n), dtype=np.int64)
    rand = rng.integers(0, 1 << 64, (1, n), dtype=np.uint64)
    rand[0, :2] = [0xFFFF_0000_0000_0000, 0]  # the largest and the smallest dither
    f, untwist = np.zeros((1, 1, n)), np.zeros(n // 2)
    out = np.empty((1, n), dtype=np.int64)
    kernels.finish_encrypt(f, untwist, untwist, 26, log_q, delta, msg, rand, out, drop)
    for m, r, got in zip(msg[0].tolist(), rand[0].tolist(), out[0].tolist()):
        e = bin(r & 0xFFFFFF).count("1") - bin((r >> 24) & 0xFFFFFF).count("1")
        b = (delta * m + e) % q
        assert got == ((b + ((r >> 48) % (1 << drop))) >> drop) % kept


def test_the_rounding_of_an_upload_is_unbiased_and_within_one_step() -> None:
    """Stochastic rounding: 2^drop * out - b lies in (-2^drop, 2^drop) and averages 0, the premise of
    the noise bound (params.fresh_variance); a rounding to nearest would be biased for a fixed b."""
    drop, n, rows, log_q = 6, 1024, 64, 50
    b_value = 12345 * 64 + 17  # one fixed word: its error is 17 or 17 - 64, never the average 0
    msg = np.full((rows, n), 0, dtype=np.int64)
    rand = np.frombuffer(np.random.default_rng(1).bytes(8 * rows * n), dtype=np.uint64).reshape(rows, n)
    rand = rand & np.uint64(0xFFFF_0000_0000_0000)  # e = 0: b is exactly delta * 0 + b_value below
    f, untwist = np.zeros((rows, 1, n)).reshape(1, rows, n), np.zeros(n // 2)
    out = np.empty((rows, n), dtype=np.int64)
    kernels.finish_encrypt(f, untwist, untwist, 26, log_q, 1, msg + b_value, rand, out, drop)
    err = out.astype(np.float64) * (1 << drop) - b_value
    assert set(np.unique(err).tolist()) == {-17.0, 64.0 - 17.0}
    # mean 0 with std 64 * sqrt(p (1-p)) / sqrt(65536) ~ 0.08: 8 standard deviations is 0.7
    assert abs(err.mean()) < 0.7


@pytest.mark.parametrize("log_q, delta", [(46, 1019724), (64, (1 << 14) + 3), (30, 1 << 12)])
def test_decode_rounds_half_up_exactly(log_q: int, delta: int) -> None:
    """The float quotient plus one integer correction equals round-half-up of the centred value,
    including values exactly at and around +-delta/2 from a multiple and at the ends of the range."""
    q = 1 << log_q
    ks = [0, 1, -1, 7, -7, (q // 2) // delta - 1, -((q // 2) // delta) + 1]
    offsets = [0, 1, -1, delta // 2, delta // 2 - 1, -(delta // 2), -(delta // 2) - 1, (delta + 1) // 2]
    vals = [k * delta + o for k in ks for o in offsets if -q // 2 <= k * delta + o < q // 2]
    n = 2 * ((len(vals) + 1) // 2)
    vals += [0] * (n - len(vals))
    b_words = np.array([v % q for v in vals], dtype=np.uint64).view(np.int64)[None]
    f, untwist = np.zeros((1, 1, n)), np.zeros(n // 2)  # A''*s = 0
    out = np.empty((1, n), dtype=np.int64)
    kernels.finish_decrypt(f, untwist, untwist, 26, log_q, log_q, log_q, delta, b_words, out)
    want = [(2 * v + delta) // (2 * delta) for v in vals]  # floor(v / delta + 1/2)
    assert out[0].tolist() == want


def test_parameters_keep_decoded_values_in_the_rounding_range() -> None:
    """finish_decrypt's rounding trick needs |y| < 2^ROUND_BITS: Params refuses a delta that allows more."""
    with pytest.raises(ParameterError, match="too small"):
        Params(n=4096, log_q=64, delta=3, x_bits=2, w_l1=1, w_l2sq=1, out_bits_a=64, out_bits_b=64)


def test_blocked_copy_transposes_both_ways() -> None:
    x = np.arange(37 * 19, dtype=np.int64).reshape(37, 19)
    tile = np.empty((19, 37), dtype=np.int64)
    kernels.copy_blocked(x.T, tile)
    assert np.array_equal(tile, x.T)
    back = np.empty_like(x)
    kernels.copy_blocked(tile, back.T)
    assert np.array_equal(back, x)


@pytest.mark.parametrize("library", ["scipy", "FFTW"])
@pytest.mark.parametrize("profile", ["default", "shared-mask"])
def test_both_fft_libraries_are_exact(monkeypatch: pytest.MonkeyPatch, library: str, profile: str) -> None:
    """scipy's pocketfft is the default install's transform, FFTW the `fastfft` extra's: both give
    exact products on a full block, with one-limb decryption."""
    if library == "scipy":
        monkeypatch.setattr(ring, "pyfftw", None)
    elif ring.pyfftw is None:
        pytest.skip("pyfftw (the fastfft extra) is not installed")
    assert ring.fft_library().startswith(library)
    be = get_backend("rlwe")
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-128, 128, (2048, 300), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (300, 70), generator=gen, dtype=torch.int8)
    params = be.params_for(w, 8, profile=profile)
    assert profile == "shared-mask" or params.decrypt_one_limb
    sk = be.keygen(params, weights=PlainWeights(w))
    assert torch.equal(be.decrypt(sk, be.matmul(be.encrypt(sk, x), w)), x.long() @ w.long())


def test_concurrent_calls_keep_their_scratch_apart() -> None:
    """Crypto runs on a shared pool and on callers' threads at once (the node client encrypts two
    calls in parallel): per-thread scratch buffers must never mix two calls' data."""
    from concurrent.futures import ThreadPoolExecutor

    be = get_backend("rlwe")
    gen = torch.Generator().manual_seed(11)
    jobs = []
    for tokens, d_in, d_out in [(2048, 300, 40), (700, 129, 300), (5, 64, 7), (2100, 200, 130)]:
        w = torch.randint(-127, 128, (d_in, d_out), generator=gen, dtype=torch.int8)
        x = torch.randint(-128, 128, (tokens, d_in), generator=gen, dtype=torch.int8)
        jobs.append((x, w, be.keygen(be.params_for(w, 8))))

    def run(job):
        x, w, sk = job
        return all(torch.equal(be.decrypt(sk, be.matmul(be.encrypt(sk, x), w)), x.long() @ w.long()) for _ in range(2))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, jobs * 2))
