"""The optional backends against the clear reference ``x.long() @ w.long()``.

* ``concrete`` (concrete-python): exact, tiny shapes only (<= 16 tokens, <= 64 x 64 weights).
* ``zama-glwe`` (concrete-ml-extensions): approximate; any shape >= 1 (no 512 minimum on CPU),
  results within the tolerance its parameters derive from the library's noise.

Each group skips when its library is missing. Data comes from seeded torch generators (test data
only: every key and mask comes from the libraries' key generation or os.urandom).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from cipherswarm.fhe_backend import (
    InputRangeError,
    InvalidCiphertext,
    KeyMismatch,
    ParameterError,
    ShapeMismatch,
    get_backend,
)


def reference(x: torch.Tensor, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    return x.long() @ (w.long().t() if transpose else w.long())


def rand(gen: torch.Generator, lo: int, hi: int, *shape: int) -> torch.Tensor:
    """Integers in [lo, hi] (both ends included), so negative values and both extremes occur."""
    return torch.randint(lo, hi + 1, shape, generator=gen)


# -- concrete: exact ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def concrete():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # concrete's namespace package imports pkg_resources
        pytest.importorskip("concrete.fhe")
    return get_backend("concrete")


@pytest.mark.concrete
class TestConcrete:
    @pytest.mark.parametrize(
        "tokens, d_in, d_out, x_bits, w_max",
        [(3, 5, 4, 4, 8), (2, 8, 8, 8, 127), (1, 1, 1, 2, 1)],
    )
    def test_exact_with_round_trips(self, concrete, tokens, d_in, d_out, x_bits, w_max) -> None:
        gen = torch.Generator().manual_seed(tokens * 100 + d_in * 10 + d_out)
        half = 1 << (x_bits - 1)
        x = rand(gen, -half, half - 1, tokens, d_in)
        x[0, 0] = -half  # the extremes of the input range are the hardest case for the bit widths
        w = rand(gen, -w_max, w_max, d_in, d_out)
        params = concrete.params_for(w, x_bits)
        sk = concrete.keygen(params)
        ct = concrete.Ciphertext.from_bytes(concrete.encrypt(sk, x).to_bytes())
        out = concrete.Result.from_bytes(concrete.matmul(ct, w).to_bytes())
        y = concrete.decrypt(sk, out)
        assert y.dtype == torch.int64
        assert torch.equal(y, reference(x, w))

    def test_transpose(self, concrete) -> None:
        gen = torch.Generator().manual_seed(7)
        x = rand(gen, -8, 7, 4, 6)
        w = rand(gen, -9, 9, 5, 6)  # (d_out, d_in): the product is x @ w.T
        params = concrete.params_for(w, 4, transpose=True)
        assert params == concrete.params_for(w.t().contiguous(), 4)  # same circuit, same cache entry
        sk = concrete.keygen(params)
        y = concrete.decrypt(sk, concrete.matmul(concrete.encrypt(sk, x), w, transpose=True))
        assert torch.equal(y, reference(x, w, transpose=True))

    def test_keys_are_fresh(self, concrete) -> None:
        """Two keygens give independent keys: one key's result is garbage under the other."""
        w = torch.tensor([[3, -2], [1, 5], [-4, 0]])
        x = torch.tensor([[7, -8, 1]])
        params = concrete.params_for(w, 4)
        a, b = concrete.keygen(params), concrete.keygen(params)
        out = concrete.matmul(concrete.encrypt(a, x), w)
        with pytest.raises(KeyMismatch):
            concrete.decrypt(b, out)
        forged = dataclasses.replace(out, key_id=b.key_id)  # a forged label only decrypts to garbage
        assert not torch.equal(concrete.decrypt(b, forged), reference(x, w))

    def test_refusals(self, concrete) -> None:
        gen = torch.Generator().manual_seed(3)
        w = rand(gen, -5, 5, 4, 3)
        params = concrete.params_for(w, 4)
        sk = concrete.keygen(params)
        x = rand(gen, -8, 7, 2, 4)
        ct = concrete.encrypt(sk, x)
        with pytest.raises(ShapeMismatch, match="tiny circuits only"):
            concrete.params_for(torch.ones(65, 2, dtype=torch.long), 4)
        with pytest.raises(ShapeMismatch, match="at most 16 tokens"):
            concrete.encrypt(sk, torch.zeros(17, 4, dtype=torch.long))
        with pytest.raises(InputRangeError):
            concrete.encrypt(sk, x + 8)
        with pytest.raises(ShapeMismatch, match="contract over"):
            concrete.matmul(ct, w, transpose=True)
        with pytest.raises(ParameterError, match="other weights"):
            concrete.matmul(ct, w + 1)
        with pytest.raises(ParameterError, match="no secure parameters"):
            concrete.params_for(torch.full((8, 2), 1 << 21), 16)
        data = ct.to_bytes()
        for bad in (data[:20], data[:-1], data + b"\0", data[:100] + bytes(len(data) - 100)):
            with pytest.raises(InvalidCiphertext):
                concrete.Ciphertext.from_bytes(bad)


# -- zama-glwe: approximate ---------------------------------------------------------------------------

D = 512  # the contraction the tolerance is checked on; any size works (see test_small_shapes_work)


@pytest.fixture(scope="module")
def zama():
    pytest.importorskip("concrete_ml_extensions")
    be = get_backend("zama-glwe")
    gen = torch.Generator().manual_seed(11)
    w = rand(gen, -127, 127, D, 32).to(torch.int8)
    params = be.params_for(w, 8)
    return be, w, params, be.keygen(params)  # one key (~5-10 s, 134 MB) serves the whole module


@pytest.mark.zama
class TestZama:
    def test_within_tolerance_with_round_trips(self, zama) -> None:
        """Tolerance, derived in ``ZamaParams.tolerance`` from the library's parameters:

        the decryption noise (q units) sums independent uniform rounding errors (input body stored
        mod 2^39, keyswitch decomposition to 28 bits, output stored mod 2^26: that one dominates,
        ~2^41.8 q/2^64) and Gaussian key noise, so it is sub-Gaussian with the summed variance
        sigma^2; decoding divides by Delta = 2^(64-B) and rounds, so |error| <= 9.49 sigma + 1/2
        except with probability 2^-64 per value. Int8 x int8 over 512 features needs B = 24:
        sigma = 3.55, tolerance 34, i.e. 2e-6 of the output range 2^23. The bound takes the
        worst-case key weight; measured noise is ~0.7 sigma (max |error| 5-9 here). Errors within
        a token row share an offset, so a sample std over 4 rows is too noisy to assert on.
        """
        be, w, params, sk = zama
        assert not be.exact
        assert params.bits == 24 and params.tolerance == 34
        gen = torch.Generator().manual_seed(12)
        x = rand(gen, -128, 127, 4, D)
        ct = be.Ciphertext.from_bytes(be.encrypt(sk, x).to_bytes())
        out = be.Result.from_bytes(be.matmul(ct, w).to_bytes())
        y = be.decrypt(sk, out)
        assert y.dtype == torch.int64 and y.shape == (4, 32)
        assert int((y - reference(x, w)).abs().max()) <= params.tolerance

    def test_transpose(self, zama) -> None:
        be, w, params, sk = zama
        wt = w.t().contiguous()  # (d_out, d_in): the product is x @ wt.T == x @ w
        assert be.params_for(wt, 8, transpose=True) == params
        gen = torch.Generator().manual_seed(13)
        x = rand(gen, -128, 127, 2, D)
        y = be.decrypt(sk, be.matmul(be.encrypt(sk, x), wt, transpose=True))
        assert int((y - reference(x, wt, transpose=True)).abs().max()) <= params.tolerance

    def test_exact_when_results_are_small(self, zama) -> None:
        """With B <= 17 result bits the tolerance is 0: 4-bit inputs and weights are exact."""
        be, _, _, sk = zama
        gen = torch.Generator().manual_seed(14)
        x, w = rand(gen, -8, 7, 3, D), rand(gen, -8, 7, D, 8)
        params = be.params_for(w, 4)
        assert params.bits <= 17 and params.tolerance == 0
        k = sk.for_params(params)  # same key material, other encoding: no second 10 s keygen
        assert torch.equal(be.decrypt(k, be.matmul(be.encrypt(k, x), w)), reference(x, w))

    def test_small_shapes_work(self, zama) -> None:
        """The library has no minimum dimension on CPU: 1 feature, 3 outputs, not a multiple of 2048."""
        be, _, _, sk = zama
        for tokens, d_in, d_out in ((1, 1, 3), (2, 37, 5)):
            gen = torch.Generator().manual_seed(d_in)
            x, w = rand(gen, -128, 127, tokens, d_in), rand(gen, -127, 127, d_in, d_out)
            k = sk.for_params(be.params_for(w, 8))
            y = be.decrypt(k, be.matmul(be.encrypt(k, x), w))
            assert int((y - reference(x, w)).abs().max()) <= k.params.tolerance

    def test_refusals(self, zama) -> None:
        be, w, params, sk = zama
        gen = torch.Generator().manual_seed(15)
        x = rand(gen, -128, 127, 2, D)
        ct = be.encrypt(sk, x)
        with pytest.raises(ShapeMismatch, match="non-empty"):  # too small: no features at all
            be.encrypt(sk, torch.zeros(2, 0, dtype=torch.long))
        with pytest.raises(ShapeMismatch, match="non-empty"):  # too small: no tokens
            be.encrypt(sk, torch.zeros(0, D, dtype=torch.long))
        with pytest.raises(ShapeMismatch, match="contract over"):
            be.matmul(ct, w[:-1])
        with pytest.raises(ShapeMismatch, match="contract over"):
            be.matmul(ct, w, transpose=True)
        with pytest.raises(ShapeMismatch, match="integer"):
            be.matmul(ct, w.float())
        with pytest.raises(InputRangeError):
            be.encrypt(sk, x * 2)
        with pytest.raises(ParameterError, match="could wrap"):  # weights larger than the params cover
            be.matmul(ct, w.long() * 2)
        with pytest.raises(ParameterError, match="result bits"):  # beyond the 48 bits supported
            be.params_for(torch.full((D, 2), 1 << 30), 16)

    def test_keys_and_bytes(self, zama) -> None:
        be, w, params, sk = zama
        gen = torch.Generator().manual_seed(16)
        ct = be.encrypt(sk, rand(gen, -128, 127, 1, D))
        out = be.matmul(ct, w)
        with pytest.raises(KeyMismatch):
            be.decrypt(sk, dataclasses.replace(out, key_id=os.urandom(8)))
        with pytest.raises(KeyMismatch, match="no compression key"):  # provider never saw this client
            be.matmul(dataclasses.replace(ct, key_id=os.urandom(8)), w)
        data = ct.to_bytes()
        for bad in (data[:10], data[:-1], data[:60] + bytes(40)):
            with pytest.raises(InvalidCiphertext):
                be.Ciphertext.from_bytes(bad)
        header = len(data) - len(ct.inner.serialize())
        with pytest.raises(InvalidCiphertext):  # a well-framed but truncated payload (a library panic)
            be.Ciphertext.from_bytes(data[: header - 8] + (len(data) - header - 64).to_bytes(8, "little")
                                     + data[header : len(data) - 64])
