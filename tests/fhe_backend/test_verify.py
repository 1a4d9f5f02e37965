"""The Freivalds verifier from sketches: exact products pass, any wrong or out-of-bound value fails,
every chunk shape the client sends (contraction rows, runs of column blocks) is checkable, and the
verifier keeps a few hundredths of a byte per weight instead of the weights."""

from __future__ import annotations

import pytest
import torch

from cipherswarm.fhe_backend import ShapeMismatch, VerificationFailed, get_backend
from cipherswarm.fhe_backend.params import WeightStats, choose_params
from cipherswarm.fhe_backend.verify import FreivaldsVerifier, column_grid, sketch_bytes

GEN = torch.Generator().manual_seed(5)


def _w(d_in: int, d_out: int) -> torch.Tensor:
    return torch.randint(-127, 128, (d_in, d_out), generator=GEN, dtype=torch.int8)


def _x(tokens: int, features: int) -> torch.Tensor:
    return torch.randint(-128, 128, (tokens, features), generator=GEN, dtype=torch.int8)


@pytest.mark.parametrize("transpose", [False, True])
def test_every_chunk_shape_checks_against_the_sketch(transpose: bool) -> None:
    w = _w(300, 700)
    mat = (w.T if transpose else w).long()  # (contraction, width) of the checked product
    v = FreivaldsVerifier(w, transpose=transpose, y_bound=2**30)
    assert v.grid == column_grid(*mat.shape) and len(v.grid) - 1 == 4
    x = _x(40, mat.shape[0])
    v.check(x, x.long() @ mat)
    g = v.grid
    for rows in (range(0, mat.shape[0]), range(7, 123)):
        for b0, b1 in ((0, 1), (1, 3), (3, 4), (0, 4)):
            part = x[:, rows.start : rows.stop]
            y = part.long() @ mat[rows.start : rows.stop, g[b0] : g[b1]]
            v.check(part, y, contraction=rows, output=range(g[b0], g[b1]))
            y[5, -1] += 1
            with pytest.raises(VerificationFailed, match="1 of 40 rows"):
                v.check(part, y, contraction=rows, output=range(g[b0], g[b1]))


def test_columns_off_the_grid_are_refused() -> None:
    w = _w(32, 64)
    v = FreivaldsVerifier(w, y_bound=2**20)
    x = _x(4, 32)
    with pytest.raises(ShapeMismatch, match="grid"):
        v.check(x, x.long() @ w.long()[:, 3:40], output=range(3, 40))


def test_a_value_beyond_the_decryption_bound_is_refused_by_the_verifier_itself() -> None:
    """y + 2^63 equals y mod 2^64 times anything even, so the product check alone passes it whenever
    every check value is even (1 in 2^m): the bound check refuses it every time, with fresh secrets."""
    w = _w(16, 8)
    x = _x(6, 16)
    y = x.long() @ w.long()
    forged = y.clone()
    forged[2, 3] += 2**63
    for _ in range(64):
        v = FreivaldsVerifier(w, y_bound=2**20)
        v.check(x, y)
        with pytest.raises(VerificationFailed, match="1 of 6 rows"):
            v.check(x, forged)
    bound = FreivaldsVerifier(w, y_bound=int(y.abs().max()))
    bound.check(x, y)  # the bound itself is allowed


def test_decryption_garbage_under_another_key_is_refused() -> None:
    be = get_backend("rlwe")
    w = _w(64, 32)
    params = be.params_for(w, 8)
    x = _x(20, 64)
    out = be.matmul(be.encrypt(be.keygen(params), x), w)
    other = be.keygen(params)
    label = be.encrypt(other, x).key_id  # a valid label under the other key, copied from another request
    garbage = be.decrypt(other, type(out)(out.params, label, out.tokens, out.a_words, out.b_words))
    with pytest.raises(VerificationFailed):
        FreivaldsVerifier.for_params(w, params).check(x, garbage)


def test_the_verifier_keeps_sketches_not_weights() -> None:
    """A LLaMA-8B block's layers, both directions, cost under 0.04 bytes per weight of sketches
    (0.13 for the compact profile's COMPACT_REPS check vectors); small layers keep MIN_BLOCKS column
    blocks; the weights are not kept."""
    stats = WeightStats(l1=4096 * 127, l2sq=4096 * 127**2)  # the largest 8-bit columns at these widths
    block = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    for profile, per_weight in (("default", 0.04), ("compact", 0.13)):
        params = choose_params(stats, 8, profile=profile)
        held = sum(sketch_bytes(*((o, i) if t else (i, o)), params) for i, o in block for t in (False, True))
        assert held / sum(i * o for i, o in block) < per_weight
    assert len(column_grid(64, 128)) - 1 == 4 and len(column_grid(4096, 4096)) - 1 == 4 and len(column_grid(4096, 1024)) - 1 == 1
    w = _w(512, 2048)
    params = get_backend("rlwe").params_for(w, 8)
    v = FreivaldsVerifier.for_params(w, params)
    assert v.nbytes == sketch_bytes(512, 2048, params)
    assert not any(isinstance(value, torch.Tensor) for value in vars(v).values())


def test_weights_must_be_int8() -> None:
    with pytest.raises(ShapeMismatch, match="int8"):
        FreivaldsVerifier(torch.zeros(4, 4, dtype=torch.int64), y_bound=2**20)


def _compact_product(w: torch.Tensor, x: torch.Tensor, *, transpose: bool = False):
    be = get_backend("rlwe")
    params = be.params_for(w, 8, transpose=transpose, profile="compact")
    key = be.keygen(params)
    y = be.decrypt(key, be.matmul(be.encrypt(key, x), w, transpose=transpose))
    return params, y


@pytest.mark.parametrize("transpose", [False, True])
def test_compact_products_pass_the_tolerance_check_and_wrong_values_fail(transpose: bool) -> None:
    """Honest compact products are off by at most the decoded-error bound and pass on every chunk
    shape; a value moved by far more than the check's window fails its row."""
    w = _w(300, 700)
    mat = (w.T if transpose else w).long()
    x = _x(64, mat.shape[0])
    params, y = _compact_product(w, x, transpose=transpose)
    exact = x.long() @ mat
    assert params.compact and 0 < (y - exact).abs().max() <= params.decoded_error
    v = FreivaldsVerifier.for_params(w, params, transpose=transpose)
    assert v.tolerate is params and v.reps == 8
    v.check(x, y)
    with pytest.raises(VerificationFailed, match="wrong"):
        FreivaldsVerifier(w, transpose=transpose, y_bound=params.decoded_bound).check(x, y)  # exact checks refuse the noise
    g = v.grid
    for rows in (range(0, mat.shape[0]), range(7, 123)):
        part = x[:, rows.start : rows.stop]
        sub = params.with_row_parts(2) if rows.stop - rows.start < mat.shape[0] else params
        for b0, b1 in ((0, 1), (1, 3), (0, 4)):
            cols = range(g[b0], g[b1])
            yp = part.long() @ mat[rows.start : rows.stop, cols.start : cols.stop]
            yp += torch.randint(-int(params.decoded_error), int(params.decoded_error) + 1, yp.shape, generator=GEN)
            checker = FreivaldsVerifier.for_params(w, sub, transpose=transpose)
            checker.check(part, yp, contraction=rows, output=cols)
            window = 1000 * int(params.decoded_error) * (cols.stop - cols.start)
            yp[5, -1] += window
            with pytest.raises(VerificationFailed, match="1 of 64 rows"):
                checker.check(part, yp, contraction=rows, output=cols)


def test_compact_check_refuses_plausible_values_in_the_wrong_places() -> None:
    """The tolerance is the noise's tail bound, not the values' size: a row whose values are all
    honest but rotated by one column fails, as does a row off by a small constant everywhere."""
    w = _w(256, 512)
    x = _x(32, 256)
    params, y = _compact_product(w, x)
    v = FreivaldsVerifier.for_params(w, params)
    v.check(x, y)
    rotated = y.clone()
    rotated[3] = torch.roll(rotated[3], 1)
    with pytest.raises(VerificationFailed, match="1 of 32 rows"):
        v.check(x, rotated)
    shifted = y.clone()
    shifted[9] += 4 * int(params.decoded_error)  # a bias of a few noise bounds on every value
    with pytest.raises(VerificationFailed, match="1 of 32 rows"):
        v.check(x, shifted)
