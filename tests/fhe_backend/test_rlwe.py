"""The rlwe backend: exactness, splits, wire form, security checks and typed errors."""

from __future__ import annotations

import dataclasses
import math
import os

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherswarm.fhe_backend import (
    Ciphertext,
    InputRangeError,
    InvalidCiphertext,
    KeyMismatch,
    MatmulResult,
    ParameterError,
    PlainWeights,
    ShapeMismatch,
    VerificationFailed,
    get_backend,
)
from cipherswarm.fhe_backend.ciphertext import result_size
from cipherswarm.fhe_backend.keys import SecretKey
from cipherswarm.fhe_backend.params import COMPACT_DELTA, Params, WeightStats, _params_dropping, choose_params
from cipherswarm.fhe_backend.ring import secret_eval_bound
from cipherswarm.fhe_backend.sampling import expand_mask, expand_ternary
from cipherswarm.fhe_backend.security import MAX_LOG_Q_128, check_secure
from cipherswarm.fhe_backend.verify import FreivaldsVerifier

be = get_backend("rlwe")


def rand_x(tokens: int, d: int, bits: int = 8, *, gen: torch.Generator | None = None) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.randint(-half, half, (tokens, d), generator=gen)


def rand_w(d_in: int, d_out: int, *, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(-127, 128, (d_in, d_out), generator=gen, dtype=torch.int8)


def roundtrip(x: torch.Tensor, w: torch.Tensor, *, transpose: bool = False, bits: int = 8) -> torch.Tensor:
    params = be.params_for(w, x_bits=bits, transpose=transpose)
    sk = be.keygen(params)
    ct = Ciphertext.from_bytes(be.encrypt(sk, x).to_bytes())
    out = MatmulResult.from_bytes(be.matmul(ct, w, transpose=transpose).to_bytes())
    return be.decrypt(sk, out)


class TestPaddingStaysHome:
    """Only the real tokens' B words travel: a micro-batch shorter than N pays its own tokens in B."""

    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    @pytest.mark.parametrize("tokens", [1, 300, 2048 + 5, 2 * 2048])
    def test_wire_bytes_follow_the_real_tokens_and_round_trip_exactly(self, profile: str, tokens: int) -> None:
        w = rand_w(64, 16)
        x = rand_x(tokens, 64)
        params = be.params_for(w, 8, profile=profile)
        sk = be.keygen(params, weights=w) if profile == "shared-mask" else be.keygen(params)
        p = sk.params
        ct = be.encrypt(sk, x)
        wire = ct.to_bytes()
        # magic, 11 parameters (12 for a rounded upload: the shared mask's), key id, 4 u32 | a seed
        # per block | the real tokens' B words
        rounded = profile == "shared-mask"
        assert (p.in_bits < p.log_q) == rounded and wire[:4] == (b"CSX3" if rounded else b"CSX2")
        params_bytes = 8 * (12 if rounded else 11)
        # rounded: words at exactly in_bits bits (64 features: whole bytes per token)
        assert p.payload_bytes(tokens, 64) == (64 * tokens * p.in_bits // 8 if rounded else -(-p.log_q // 8) * 64 * tokens)
        assert len(wire) == 4 + params_bytes + 8 + 16 + 32 * ct.blocks + p.payload_bytes(tokens, 64)
        back = Ciphertext.from_bytes(wire)
        assert np.array_equal(back.words, ct.words) and back.tokens == tokens
        out = be.matmul(back, w)
        seeds = 32 * ct.blocks if profile == "shared-mask" else 0
        assert len(out.to_bytes()) == 4 + params_bytes + 8 + 12 + seeds + p.result_bytes(tokens, 16)
        reply = MatmulResult.from_bytes(out.to_bytes())
        assert np.array_equal(reply.b_words, out.b_words)
        assert reply.a_words is None if profile == "shared-mask" else np.array_equal(reply.a_words, out.a_words)
        assert torch.equal(be.decrypt(sk, reply), x @ w.long())

    @pytest.mark.parametrize("tokens", [300, 2048])
    def test_wide_words_travel_apart_and_round_trip_exactly(self, tokens: int) -> None:
        """14-bit activations against 11-bit weights: A'' and B'' too wide for one word (the default)."""
        w = torch.randint(-1023, 1024, (512, 16), dtype=torch.int16)
        x = rand_x(tokens, 512, bits=14)
        sk = be.keygen(be.params_for(w, 14))
        p = sk.params
        assert p.out_bits_a + p.out_bits_b > 64
        out = be.matmul(Ciphertext.from_bytes(be.encrypt(sk, x).to_bytes()), w)
        wire = out.to_bytes()
        assert len(wire) == 4 + 88 + 8 + 12 + p.result_bytes(tokens, 16)
        assert torch.equal(be.decrypt(sk, MatmulResult.from_bytes(wire)), x @ w.long())

    def test_a_short_block_returns_a_whole_mask_product_and_its_own_tokens_of_b(self) -> None:
        w = rand_w(64, 16)
        sk = be.keygen(be.params_for(w, 8))
        p = sk.params
        short = be.matmul(be.encrypt(sk, rand_x(256, 64)), w).to_bytes()
        assert p.out_bits_a + p.out_bits_b <= 64  # A'' and B'' share a word
        pair, alone = -(-(p.out_bits_a + p.out_bits_b) // 8), -(-p.out_bits_a // 8)
        assert len(short) == 4 + 88 + 8 + 12 + 16 * (256 * pair + (p.n - 256) * alone)


class TestExactness:
    def test_quick_start(self) -> None:
        x = torch.randint(-128, 128, (300, 512))
        w = torch.randint(-127, 128, (512, 256))
        params = be.params_for(w, x_bits=8)
        sk = be.keygen(params)
        ct = be.encrypt(sk, x)
        wire = ct.to_bytes()
        out = be.matmul(type(ct).from_bytes(wire), w)
        y = be.decrypt(sk, type(out).from_bytes(out.to_bytes()))
        assert torch.equal(y, x @ w)

    @settings(max_examples=12)
    @given(
        tokens=st.integers(1, 2600),
        d_in=st.integers(1, 300),
        d_out=st.integers(1, 70),
        bits=st.integers(2, 16),
        seed=st.integers(0, 2**31),
        transpose=st.booleans(),
    )
    def test_random_shapes(self, tokens: int, d_in: int, d_out: int, bits: int, seed: int, transpose: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = rand_w(d_in, d_out, gen=gen)
        x = rand_x(tokens, d_out if transpose else d_in, bits, gen=gen)
        ref = x @ (w.long().T if transpose else w.long())
        assert torch.equal(roundtrip(x, w, transpose=transpose, bits=bits), ref)

    @pytest.mark.parametrize("bits", [8, 16])
    def test_extreme_values(self, bits: int) -> None:
        """All-extreme activations against all-extreme weights hit max|y| exactly."""
        d = 1024
        x = torch.full((5, d), -(1 << (bits - 1)), dtype=torch.int64)
        x[1] = (1 << (bits - 1)) - 1
        w = torch.full((d, 3), 127, dtype=torch.int64)
        w[:, 1] = -128
        assert torch.equal(roundtrip(x, w, bits=bits), x @ w)

    def test_llama_8b_mlp_contraction(self) -> None:
        """d_in = 14336 (LLaMA-8B down_proj) stays exact."""
        gen = torch.Generator().manual_seed(1)
        x, w = rand_x(3, 14336, gen=gen), rand_w(14336, 4, gen=gen)
        assert torch.equal(roundtrip(x, w), x @ w.long())

    def test_sixteen_bit_activations_pick_bigger_ring(self) -> None:
        w = torch.full((4096, 2), 127, dtype=torch.int8)  # max column norms: log q > 54
        params = be.params_for(w, x_bits=16)
        assert params.n == 4096 and params.log_q > MAX_LOG_Q_128[2048]
        x = rand_x(4, 4096, 16)
        assert torch.equal(roundtrip(x, w, bits=16), x @ w.long())

    @pytest.mark.parametrize("d_in, tokens, bits, one_limb", [(14336, 2048, 8, True), (512, 5, 16, False)])
    def test_both_decryption_paths(self, d_in: int, tokens: int, bits: int, one_limb: bool) -> None:
        """8-bit layers up to LLaMA-8B's widest decrypt with the one-limb product (its error inside the
        budget); 16-bit activations need wider moduli and decrypt with exact limbs."""
        gen = torch.Generator().manual_seed(d_in)
        w = rand_w(d_in, 16, gen=gen)
        assert be.params_for(w, bits).decrypt_one_limb is one_limb
        x = rand_x(tokens, d_in, bits, gen=gen)
        assert torch.equal(roundtrip(x, w, bits=bits), x @ w.long())

    @pytest.mark.parametrize("transpose", [False, True])
    def test_int64_provider_method(self, transpose: bool) -> None:
        gen = torch.Generator().manual_seed(3)
        w = rand_w(200, 40, gen=gen)
        x = rand_x(300, 40 if transpose else 200, gen=gen)
        params = be.params_for(w, 8, transpose=transpose)
        sk = be.keygen(params)
        y = be.decrypt(sk, be.matmul(be.encrypt(sk, x), w, transpose=transpose, method="i64"))
        assert torch.equal(y, x @ (w.long().T if transpose else w.long()))

    def test_plain_weights_reused(self) -> None:
        w = rand_w(64, 32)
        pw = PlainWeights(w)
        params = be.params_for(pw, 8)
        sk = be.keygen(params)
        for _ in range(2):
            x = rand_x(10, 64)
            assert torch.equal(be.decrypt(sk, be.matmul(be.encrypt(sk, x), pw)), x @ w.long())


class TestSplits:
    """Token blocks, output columns and contraction rows: every split re-aggregates exactly."""

    def setup_method(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.w = rand_w(96, 48, gen=gen)
        self.x = rand_x(2048 * 2 + 17, 96, gen=gen)
        self.params = be.params_for(self.w, 8)
        self.sk = be.keygen(self.params)
        self.ct = be.encrypt(self.sk, self.x)
        self.ref = self.x @ self.w.long()

    def test_token_blocks(self) -> None:
        parts = [be.matmul(self.ct.select_blocks(a, b), self.w) for a, b in ((0, 1), (1, 3))]
        y = be.decrypt(self.sk, MatmulResult.concat_blocks(parts))
        assert torch.equal(y, self.ref)

    def test_output_columns(self) -> None:
        parts = [be.matmul(self.ct, self.w[:, a:b]) for a, b in ((0, 10), (10, 33), (33, 48))]
        assert torch.equal(be.decrypt(self.sk, MatmulResult.concat_columns(parts)), self.ref)

    def test_contraction_rows(self) -> None:
        spans = ((0, 40), (40, 41), (41, 96))
        parts = [
            MatmulResult.from_bytes(be.matmul(Ciphertext.from_bytes(self.ct.select_rows(a, b, parts=3).to_bytes()), self.w[a:b]).to_bytes())
            for a, b in spans
        ]
        assert torch.equal(be.decrypt(self.sk, MatmulResult.add(parts)), self.ref)

    def test_all_three_combined(self) -> None:
        rows = [(0, 50), (50, 96)]
        blocks = []
        for a, b in ((0, 2), (2, 3)):
            sub = self.ct.select_blocks(a, b)
            cols = []
            for c0, c1 in ((0, 20), (20, 48)):
                cols.append(MatmulResult.add([be.matmul(sub.select_rows(r0, r1, parts=2), self.w[r0:r1, c0:c1]) for r0, r1 in rows]))
            blocks.append(MatmulResult.concat_columns(cols))
        assert torch.equal(be.decrypt(self.sk, MatmulResult.concat_blocks(blocks)), self.ref)

    def test_more_row_chunks_than_budgeted_refused(self) -> None:
        parts = [be.matmul(self.ct.select_rows(i * 32, (i + 1) * 32, parts=2), self.w[i * 32 : (i + 1) * 32]) for i in range(3)]
        with pytest.raises(ShapeMismatch, match="row chunks"):
            MatmulResult.add(parts)


class TestParameters:
    def test_table_refuses_insecure(self) -> None:
        for n, limit in MAX_LOG_Q_128.items():
            check_secure(n, min(limit, 64))
            if limit < 64:
                with pytest.raises(ParameterError, match="insecure"):
                    check_secure(n, limit + 1)
            with pytest.raises(ParameterError, match="must be in"):
                check_secure(n, 65)  # q must fit a machine word

    def test_params_outside_table_refused(self) -> None:
        good = choose_params(WeightStats(l1=1000, l2sq=10000), 8)
        fields = dict(zip(Params.FIELDS, good.to_tuple()))
        with pytest.raises(ParameterError, match="insecure"):
            Params(**{**fields, "n": 1024})
        with pytest.raises(ParameterError, match="not in the 128-bit table"):
            Params(**{**fields, "n": 3000})

    def test_inexact_params_refused(self) -> None:
        good = choose_params(WeightStats(l1=1000, l2sq=10000), 8)
        fields = dict(zip(Params.FIELDS, good.to_tuple()))
        with pytest.raises(ParameterError, match="inexact"):
            Params(**{**fields, "delta": 2})  # noise swamps delta
        with pytest.raises(ParameterError, match="inexact"):
            Params(**{**fields, "w_l1": fields["w_l1"] * 4})  # y no longer fits q

    def test_only_a_shared_mask_rounds_its_upload_and_says_so_in_a_twelfth_word(self) -> None:
        stats = WeightStats(l1=1000, l2sq=100000)
        plain, shared = choose_params(stats, 8), choose_params(stats, 8, profile="shared-mask")
        assert plain.in_bits == plain.log_q and len(plain.to_tuple()) == 11  # the form older nodes read
        assert shared.in_bits < shared.log_q and len(shared.to_tuple()) == 12
        for p in (plain, shared):
            assert Params.from_tuple(p.to_tuple()) == p
        with pytest.raises(ParameterError, match="11 fields"):  # one encoding per parameter set
            Params.from_tuple(plain.to_tuple() + (plain.log_q,))
        with pytest.raises(ParameterError, match="only the shared-mask"):
            dataclasses.replace(plain, in_bits=plain.log_q - 1)  # A and B must share a modulus
        with pytest.raises(ParameterError, match="in_bits must be in"):
            dataclasses.replace(shared, in_bits=shared.log_q - 17)  # the dither has 16 bits
        with pytest.raises(ParameterError, match="out_bits_b <= in_bits"):
            dataclasses.replace(shared, out_bits_b=shared.in_bits + 1)
        with pytest.raises(ParameterError, match="inexact"):  # the rounding's noise counts
            dataclasses.replace(shared, in_bits=shared.log_q - 16, out_bits_b=min(shared.out_bits_b, shared.log_q - 16))

    def test_a_rounded_upload_saves_bits_at_llama_widths_and_stays_exact_at_the_extremes(self) -> None:
        """At LLaMA-8B's widths (14-bit activations, 8-bit gradients, 11-bit weights) each uploaded
        word is at least 2 bits narrower; on a small layer every value is still exact, the largest
        |x @ w| the parameters admit included."""
        for d, x_bits in ((4096, 14), (28672, 8), (14336, 14)):
            rms = 1023 / math.sqrt(2 * math.log(d))
            stats = WeightStats(l1=math.ceil(d * rms * math.sqrt(2 / math.pi)), l2sq=math.ceil(d * rms * rms))
            shared = choose_params(stats, x_bits, profile="shared-mask")
            assert shared.in_bits <= choose_params(stats, x_bits).log_q - 2
            unrounded = _params_dropping(stats, x_bits, None, True, 1, shared.profile, 0)
            assert shared.out_bytes <= unrounded.out_bytes  # the download is never made dearer
        # the bundled model's down_proj, transposed: the narrowest upload would cost a fourth byte
        # per downloaded value, so one bit more is uploaded instead
        stats = WeightStats(l1=40795, l2sq=20454191)
        shared, unrounded = choose_params(stats, 8, profile="shared-mask"), _params_dropping(stats, 8, None, True, 1, 1, 0)
        assert shared.out_bytes == unrounded.out_bytes == 3 and shared.in_bits < unrounded.log_q
        w = rand_w(256, 16)
        w[:, 0] = 127  # column 0 reaches the L1 bound: y = 2^7 * L1 for x = -2^7 everywhere
        x = rand_x(3000, 256)
        x[:5] = -128
        params = be.params_for(w, 8, profile="shared-mask")
        assert params.in_bits < params.log_q and params.y_max == 128 * 127 * 256
        sk = be.keygen(params, weights=w)
        out = be.matmul(Ciphertext.from_bytes(be.encrypt(sk, x).to_bytes()), w)
        y = be.decrypt(sk, MatmulResult.from_bytes(out.to_bytes()))
        assert torch.equal(y, x @ w.long()) and int(y[0, 0]) == -params.y_max

    def test_weights_heavier_than_params_refused(self) -> None:
        w = rand_w(64, 8)
        sk = be.keygen(be.params_for(w // 2, 8))
        with pytest.raises(ParameterError, match="inexact"):
            be.matmul(be.encrypt(sk, rand_x(4, 64)), w)

    def test_too_wide_for_a_word_refused(self) -> None:
        with pytest.raises(ParameterError, match="split the contraction"):
            choose_params(WeightStats(l1=2**40, l2sq=2**60), 16)

    @pytest.mark.parametrize("bits", [0, 1, 17, 8.0])
    def test_bad_x_bits(self, bits) -> None:
        with pytest.raises(ParameterError, match="x_bits"):
            be.params_for(rand_w(8, 8), bits)


class TestSecurityProperties:
    def test_two_encryptions_differ(self) -> None:
        w = rand_w(16, 4)
        sk = be.keygen(be.params_for(w, 8))
        x = rand_x(10, 16)
        a, b = be.encrypt(sk, x), be.encrypt(sk, x)
        assert a.seeds != b.seeds
        assert not np.array_equal(a.words, b.words)

    def test_wire_holds_no_key_material(self) -> None:
        w = rand_w(32, 4)
        sk = be.keygen(be.params_for(w, 8))
        ct = be.encrypt(sk, torch.zeros(2000, 32, dtype=torch.int64))
        wire = ct.to_bytes() + be.matmul(ct, w).to_bytes()
        for enc in (sk.s.astype(np.int8), sk.s.astype("<i8"), (sk.s + 1).astype(np.uint8)):
            assert enc.tobytes()[:64] not in wire
        # an encryption of zero is b = a*s + e: it looks uniform mod q, not like s (the padding
        # tokens' words are zeros that never travel)
        assert abs(float(ct.words[..., :2000].mean()) / sk.params.q - 0.5) < 0.01
        with pytest.raises(TypeError, match="never serialised"):
            pickle.dumps(sk)
        assert not any(isinstance(v, type(sk)) for v in vars(ct).values())

    def test_keys_keep_their_evaluations_under_the_bound(self) -> None:
        """Decryption's one-limb error bound assumes max |s(zeta)| <= secret_eval_bound(N): fresh keys
        meet it, and a key that does not (all ones: |s(zeta_0)| ~ 2N/pi) is refused, also on import."""
        params = be.params_for(rand_w(16, 4), 8)
        for _ in range(5):
            sk = be.keygen(params)
            assert np.abs(sk.secret_eval).max() <= secret_eval_bound(params.n)
        ones = np.ones(params.n, dtype=np.int64)
        with pytest.raises(ValueError, match="secret_eval_bound"):
            SecretKey(params=params, s=ones, key_id=bytes(8))
        blob = be.keygen(params).export_private() | {"s": ones.astype(np.int8).tobytes()}
        with pytest.raises(ValueError, match="secret_eval_bound"):
            SecretKey.import_private(blob)

    def test_other_key_refused_and_forged_label_caught(self) -> None:
        w = rand_w(32, 8)
        params = be.params_for(w, 8)
        sk1, sk2 = be.keygen(params), be.keygen(params)
        x = rand_x(20, 32)
        out = be.matmul(be.encrypt(sk1, x), w)
        with pytest.raises(KeyMismatch):
            be.decrypt(sk2, out)
        # a provider that copies a label from another request under sk2 gets past the label check
        other = be.encrypt(sk2, x).key_id
        forged = MatmulResult(out.params, other, out.tokens, out.a_words, out.b_words)
        garbage = be.decrypt(sk2, forged)
        with pytest.raises(VerificationFailed):
            FreivaldsVerifier.for_params(w, params).check(x, garbage)

    def test_labels_do_not_link_a_keys_ciphertexts(self) -> None:
        """Each ciphertext carries a fresh label that only the key's holder can tell apart: the same
        key's two requests share no label bytes an observer could match, and a random label is refused."""
        w = rand_w(32, 8)
        params = be.params_for(w, 8)
        sk = be.keygen(params)
        x = rand_x(20, 32)
        labels = {be.encrypt(sk, x).key_id for _ in range(50)}
        assert len(labels) == 50 and sk.key_id not in labels
        assert len({label[:4] for label in labels}) == 50 and len({label[4:] for label in labels}) == 50
        out = be.matmul(be.encrypt(sk, x), w)
        torch.testing.assert_close(be.decrypt(sk, out), x.long() @ w.long(), rtol=0, atol=0)
        with pytest.raises(KeyMismatch):
            be.decrypt(sk, MatmulResult(out.params, os.urandom(8), out.tokens, out.a_words, out.b_words))

    def test_mask_expansion_known_answer(self) -> None:
        """AES-256-CTR under the seed, counter = first_row * n / 2, little-endian 64-bit words.

        Fixed vectors for seed = bytes(range(32)), n = 8: other implementations must reproduce them.
        """
        seed = bytes(range(32))
        words = expand_mask(seed, n=8, rows=2).view(np.uint64)
        assert [format(int(v), "016x") for v in words[0, :3]] == ["d09f492ab60090f2", "80772edd6a9af3a9", "e59fb94aae765df0"]
        assert format(int(words[1, 0]), "016x") == "06b8f22abce65f4e"
        # a contiguous row range is the same stretch of the stream (what a row-chunk provider expands)
        assert np.array_equal(expand_mask(seed, n=8, rows=1, first_row=1).view(np.uint64), words[1:2])


def test_shared_mask_secrets_expand_per_row_uniform_and_ternary() -> None:
    """A shared-mask key keeps only its seed: any row range expands alone to the same secrets, and
    they are uniform over {-1, 0, 1} (rejection of the byte 255)."""
    seed = bytes(range(32))
    s = expand_ternary(seed, n=4096, rows=8)
    assert s.dtype == np.int8 and set(np.unique(s)) == {-1, 0, 1}
    assert np.array_equal(expand_ternary(seed, n=4096, rows=3, first_row=5), s[5:8])
    counts = np.bincount((s + 1).ravel(), minlength=3) / s.size
    assert np.all(np.abs(counts - 1 / 3) < 0.01)
    assert not np.array_equal(expand_ternary(bytes(32), n=4096, rows=1), s[:1])


def test_a_secret_row_short_of_bytes_goes_on_from_its_own_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than n usable bytes in a row's 2n (never seen in practice) takes more from the row's
    own stretch of the stream: the row stays ternary and the same whichever range it is expanded in."""
    from cipherswarm.fhe_backend import sampling

    real = sampling.aes_ctr_stream

    def starved(key: bytes, counter: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        stream = real(key, counter, length, out).copy()
        if counter == 2 * 64 // 16:  # row 1's stretch (n = 64) when it starts a range
            stream[: 2 * 64 - 3] = 255
        elif counter == 0 and length >= 4 * 64:  # row 1's stretch inside a range from row 0
            stream[2 * 64 : 4 * 64 - 3] = 255
        return stream

    seed = bytes(range(32))
    normal = expand_ternary(seed, n=64, rows=3)
    monkeypatch.setattr(sampling, "aes_ctr_stream", starved)
    s = expand_ternary(seed, n=64, rows=3)
    assert set(np.unique(s[1])) <= {-1, 0, 1} and not np.array_equal(s[1], normal[1])
    assert np.array_equal(s[[0, 2]], normal[[0, 2]])
    assert np.array_equal(expand_ternary(seed, n=64, rows=1, first_row=1), s[1:2])


class TestSharedMask:
    """The shared-mask profile: B' only, one mask per block, key bound to the layer's weights."""

    def setup_method(self) -> None:
        gen = torch.Generator().manual_seed(11)
        self.w = rand_w(80, 36, gen=gen)
        self.x = rand_x(2048 + 300, 80, gen=gen)
        self.params = be.params_for(self.w, 8, profile="shared-mask")
        self.sk = be.keygen(self.params, weights=self.w)
        self.ref = self.x @ self.w.long()

    def test_exact_over_the_wire(self) -> None:
        ct = Ciphertext.from_bytes(be.encrypt(self.sk, self.x).to_bytes())
        out = MatmulResult.from_bytes(be.matmul(ct, self.w).to_bytes())
        assert out.a_words is None and self.params.out_bytes <= 4
        assert torch.equal(be.decrypt(self.sk, out), self.ref)

    @pytest.mark.parametrize("transpose, bits", [(True, 8), (False, 16)])
    def test_transpose_and_wide_activations(self, transpose: bool, bits: int) -> None:
        x = rand_x(50, 36 if transpose else 80, bits)
        params = be.params_for(self.w, bits, transpose=transpose, profile="shared-mask")
        sk = be.keygen(params, weights=self.w, transpose=transpose)
        y = be.decrypt(sk, be.matmul(be.encrypt(sk, x), self.w, transpose=transpose))
        assert torch.equal(y, x @ (self.w.long().T if transpose else self.w.long()))

    def test_splits(self) -> None:
        ct = be.encrypt(self.sk, self.x)
        blocks = []
        for a, b in ((0, 1), (1, 2)):
            sub = ct.select_blocks(a, b)
            rows = [be.matmul(sub.select_rows(r0, r1, parts=2), self.w[r0:r1]) for r0, r1 in ((0, 30), (30, 80))]
            blocks.append(MatmulResult.add(rows))
        assert torch.equal(be.decrypt(self.sk, MatmulResult.concat_blocks(blocks)), self.ref)
        cols = [be.matmul(ct, self.w[:, c0:c1]) for c0, c1 in ((0, 5), (5, 36))]
        assert torch.equal(be.decrypt(self.sk, MatmulResult.concat_columns(cols)), self.ref)

    def test_chunks_decrypt_alone_under_their_rows_binding(self) -> None:
        """A key made without weights (a client that reads its layer later) is bound per contraction
        range; each row chunk and each column chunk of a call then decrypts on its own, exactly."""
        sk = be.keygen(self.params, contraction=80)
        ct = be.encrypt(sk, self.x)
        part = ct.select_rows(30, 80, parts=2)
        with pytest.raises(KeyMismatch, match="not bound"):
            be.decrypt(sk, be.matmul(part, self.w[30:80]), rows=range(30, 80))
        sk.bind(self.w, rows=range(30, 80))
        sk.bind(self.w)
        assert torch.equal(be.decrypt(sk, be.matmul(part, self.w[30:80]), rows=range(30, 80)),
                           self.x[:, 30:80] @ self.w[30:80].long())
        cols = be.matmul(ct, self.w[:, 5:36])
        assert torch.equal(be.decrypt(sk, cols, columns=range(5, 36)), self.ref[:, 5:36])
        with pytest.raises(KeyMismatch, match="columns"):
            be.decrypt(sk, cols, columns=range(0, 36))
        with pytest.raises(KeyMismatch, match="secrets"):
            sk.bind(self.w[:40])

    def test_key_needs_weights_and_refuses_others(self) -> None:
        with pytest.raises(ParameterError, match="weights"):
            be.keygen(self.params)  # neither the weights nor the contraction width
        other = be.keygen(self.params, weights=self.w)
        with pytest.raises(KeyMismatch):
            be.decrypt(other, be.matmul(be.encrypt(self.sk, self.x[:4]), self.w))

    def test_tampered_seed_caught_by_verifier(self) -> None:
        out = be.matmul(be.encrypt(self.sk, self.x[:10]), self.w)
        forged = MatmulResult(out.params, out.key_id, out.tokens, None, out.b_words, (bytes(32),))
        with pytest.raises(VerificationFailed):
            FreivaldsVerifier.for_params(self.w, self.params).check(self.x[:10], be.decrypt(self.sk, forged))

    def test_profile_fields_validated(self) -> None:
        fields = dict(zip(Params.FIELDS, self.params.to_tuple()))
        with pytest.raises(ParameterError, match="out_bits_a = 0"):
            Params(**{**fields, "out_bits_a": 5})
        with pytest.raises(ParameterError, match="unknown profile"):
            Params(**{**fields, "profile": 7})


class TestCompactSharedMask:
    """Both flags: compact's approximate decoding on the shared-mask wire form, so the fewest bytes
    each way; every chunk still decrypts alone, within the bound."""

    def setup_method(self) -> None:
        gen = torch.Generator().manual_seed(12)
        self.w = torch.randint(-1023, 1024, (512, 96), generator=gen, dtype=torch.int16)
        self.x = rand_x(2048 + 300, 512, bits=14, gen=gen)
        self.params = be.params_for(self.w, 14, profile="compact-shared-mask")
        self.ref = self.x @ self.w.long()

    def test_fewest_bytes_and_noise_below_the_rounding_error(self) -> None:
        compact, shared = be.params_for(self.w, 14, profile="compact"), be.params_for(self.w, 14, profile="shared-mask")
        p = self.params
        assert p.compact and p.shared_mask and p.out_bits_a == 0 and p.pad_bytes == 0
        # its upload is rounded and bit-packed (compact's is neither); exact shared-mask's is rounded too
        assert p.in_bytes < compact.in_bytes and p.in_bytes < shared.in_bytes and p.out_bytes < min(compact.out_bytes, shared.out_bytes)
        sk = be.keygen(p, weights=self.w)
        out = MatmulResult.from_bytes(be.matmul(Ciphertext.from_bytes(be.encrypt(sk, self.x).to_bytes()), self.w).to_bytes())
        assert out.a_words is None and len(out.to_bytes()) == result_size(p, self.x.shape[0], 96)
        err = (be.decrypt(sk, out) - self.ref).double()
        assert err.abs().max() <= p.decoded_error and 0 < err.std() < (1 / 12) ** 0.5 * float(p.w_l2sq) ** 0.5 / 2
        FreivaldsVerifier.for_params(self.w, p).check(self.x, be.decrypt(sk, out))

    def test_row_chunks_decrypt_alone_within_their_bound(self) -> None:
        sk = be.keygen(self.params, contraction=512)
        ct = be.encrypt(sk, self.x)
        for r0, r1 in ((0, 200), (200, 512)):
            sk.bind(self.w, rows=range(r0, r1))
            part = be.matmul(ct.select_rows(r0, r1, parts=2), self.w[r0:r1])
            y = be.decrypt(sk, part, rows=range(r0, r1))
            bound = self.params.with_row_parts(2).decoded_error
            assert (y - self.x[:, r0:r1] @ self.w[r0:r1].long()).abs().max() <= bound

    def test_a_wrong_value_is_caught(self) -> None:
        sk = be.keygen(self.params, weights=self.w)
        y = be.decrypt(sk, be.matmul(be.encrypt(sk, self.x[:64]), self.w))
        y[3, 7] += 1 << 20
        with pytest.raises(VerificationFailed):
            FreivaldsVerifier.for_params(self.w, self.params).check(self.x[:64], y)

    def test_fields_validated(self) -> None:
        fields = dict(zip(Params.FIELDS, self.params.to_tuple()))
        assert fields["profile"] == 3
        with pytest.raises(ParameterError, match="out_bits_a = 0"):
            Params(**{**fields, "out_bits_a": 5})
        with pytest.raises(ParameterError, match="compact-shared-mask profile's budget"):
            Params(**{**fields, "out_bits_b": fields["out_bits_b"] - 2})


class TestCompact:
    """The compact profile: fewer bytes each way, values off by noise below the activations' own
    rounding error, bounded by ``Params.decoded_error``; the default wire form."""

    def setup_method(self) -> None:
        gen = torch.Generator().manual_seed(11)
        self.w = torch.randint(-1023, 1024, (512, 96), generator=gen, dtype=torch.int16)
        self.x = rand_x(2048 + 300, 512, bits=14, gen=gen)
        self.params = be.params_for(self.w, 14, profile="compact")
        self.sk = be.keygen(self.params)
        self.ref = self.x @ self.w.long()

    def _close(self, y: torch.Tensor, ref: torch.Tensor, bound: float) -> torch.Tensor:
        err = (y - ref).double()
        assert err.abs().max() <= bound
        return err

    def test_fewer_bytes_both_ways_than_the_exact_default(self) -> None:
        stats = WeightStats(l1=4096 * 300, l2sq=4096 * 400**2)  # 11-bit weights at LLaMA-8B widths
        for bits in (8, 14):
            exact, compact = choose_params(stats, bits), choose_params(stats, bits, profile="compact")
            assert compact.log_q <= exact.log_q - 12 and compact.n <= exact.n
            assert compact.in_bytes < exact.in_bytes and compact.out_bytes < exact.out_bytes

    @pytest.mark.parametrize("transpose", [False, True])
    def test_noise_stays_below_the_activations_rounding_error(self, transpose: bool) -> None:
        params = be.params_for(self.w, 14, transpose=transpose, profile="compact")
        sk = be.keygen(params)
        x = self.x[:, :96] if transpose else self.x
        out = MatmulResult.from_bytes(be.matmul(Ciphertext.from_bytes(be.encrypt(sk, x).to_bytes()), self.w, transpose=transpose).to_bytes())
        ref = x @ (self.w.T if transpose else self.w).long()
        err = self._close(be.decrypt(sk, out), ref, params.decoded_error)
        # the error a column carries from rounding its activations: sqrt(1/12) ||w[:, k]||_2
        rounding = (1 / 12) ** 0.5 * float(params.w_l2sq) ** 0.5
        assert 0 < err.std() < rounding / 2

    def test_splits_add_up_within_the_bound(self) -> None:
        ct = self.sk.params and be.encrypt(self.sk, self.x)
        rows = [(0, 200), (200, 512)]
        blocks = []
        for a, b in ((0, 1), (1, 2)):
            sub = ct.select_blocks(a, b)
            cols = [MatmulResult.add([be.matmul(sub.select_rows(r0, r1, parts=2), self.w[r0:r1, c0:c1]) for r0, r1 in rows])
                    for c0, c1 in ((0, 40), (40, 96))]
            blocks.append(MatmulResult.concat_columns(cols))
        merged = MatmulResult.concat_blocks(blocks)
        self._close(be.decrypt(self.sk, merged), self.ref, self.params.with_row_parts(2).decoded_error)

    def test_fields_validated(self) -> None:
        fields = dict(zip(Params.FIELDS, self.params.to_tuple()))
        with pytest.raises(ParameterError, match=f"delta must be >= {COMPACT_DELTA}"):
            Params(**{**fields, "delta": COMPACT_DELTA - 1})
        with pytest.raises(ParameterError, match="exceeds q"):
            Params(**{**fields, "delta": fields["delta"] + 1})  # delta * y already fills q beside the noise
        with pytest.raises(ParameterError, match="compact profile's budget"):
            Params(**{**fields, "out_bits_b": fields["out_bits_b"] - 2})  # B'' rounding 4x the noise it was given
