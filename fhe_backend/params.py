"""Per-layer parameters of the RLWE scheme, chosen from the actual weights and bit widths.

A ciphertext's parameters are exact for a weight matrix when every decrypted value is the exact
integer ``x @ w`` except with probability below ``2**-FAILURE_LOG2`` per value. That holds when

* the noise after the provider's matmul and the optional output modulus switch stays below
  ``delta / 2`` (fresh noise ``sum_j w[j,k] e_j`` is sub-Gaussian with parameter
  ``sqrt(eta/2) * ||w[:,k]||_2``; rounding ``A'`` adds ``eps * s`` with ``|eps| <= 2^(k-ka-1)``,
  sub-Gaussian by Hoeffding; rounding ``B'`` adds at most ``2^(k-kb-1)``), and
* the scaled message fits the modulus: ``delta * (2 * max|y| + 1) <= q`` with
  ``max|y| = 2^(x_bits-1) * max_k ||w[:,k]||_1``.

Both are asserted by :meth:`Params.__post_init__`, together with the 128-bit security table, so an
insecure or inexact :class:`Params` cannot be constructed.

Rounded uploads (shared-mask profiles): the low bits of an uploaded word ``b`` are mostly noise, so
the client may send ``b`` rounded from ``log_q`` to ``in_bits`` bits, and the provider computes mod
``2^in_bits``. The rounding is stochastic (a fresh uniform dither, kernels.finish_encrypt): its
error is zero-mean and spans ``2^(log_q - in_bits)``, so it adds a sub-Gaussian term with variance
proxy ``4^(log_q - in_bits - 1)`` to each input coefficient beside ``eta/2`` (Hoeffding), and the
sum over the contraction grows like the fresh noise. The first dropped bits cost the scale a
fraction of a bit each while the binomial noise dominates, later ones a whole bit once the rounding
does, so the saving tops out near log2(2 sqrt(eta/2)) ~ 2.8 bits per uploaded value (3 bits at
LLaMA-8B's widths, after rounding log_q up). It needs the single shared mask: in the
default profile the provider multiplies A mod q too, and the two words must share a modulus.
Security: the rounded word is a function of an RLWE sample and fresh randomness.

The compact profile gives up exactness for fewer bytes each way: noise is left in the decoded
value's low bits (as CKKS does) instead of being rounded away under a margin of ``TAIL`` standard
deviations. ``delta`` is then set by the activations' own rounding, not by the weights' norms: the
noise's standard deviation (fresh noise and output modulus switch together, :func:`noise_std`) is
at most 1/COMPACT_NOISE_RATIO of the error ``x`` already carries from its rounding to integers,
``sqrt(1/12) ||w[:,k]||_2`` (both scale with the column's norm). q only has to hold
``delta * (2 max|y| + 1)`` plus the noise's tail bound, so about ``log2(4 TAIL ||w||_2)`` bits fewer
travel per value in and out. The Freivalds check then accepts within a tolerance derived from
the noise's tail bound (verify.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from .errors import ParameterError
from .packing import bit_bytes
from .ring import ROUND_BITS, fft_product_error, one_limb_fits
from .security import WORD_BITS, check_secure, smallest_secure_n

#: a decoding failure happens with probability below 2**-FAILURE_LOG2 per output value
FAILURE_LOG2 = 64
#: sub-Gaussian tail factor: P(|X| > T sigma) <= 2 exp(-T^2 / 2) <= 2**-FAILURE_LOG2
TAIL = math.sqrt(2.0 * math.log(2.0) * (FAILURE_LOG2 + 1))
#: centred binomial noise parameter: e = popcount(24 bits) - popcount(24 bits), std sqrt(12) ~ 3.46
ETA = 24
MAX_X_BITS = 16
#: profiles, a set of flags: DEFAULT sends (A', B') back and decodes exactly; SHARED_MASK uses one
#: mask per block and a secret per input feature, so the provider computes and returns only B' (half
#: the work and no mask product); COMPACT decodes approximately (module docstring), on either wire
#: form; COMPACT_SHARED_MASK is both
DEFAULT, SHARED_MASK, COMPACT = 0, 1, 2
COMPACT_SHARED_MASK = COMPACT | SHARED_MASK
PROFILES = {"default": DEFAULT, "shared-mask": SHARED_MASK, "compact": COMPACT, "compact-shared-mask": COMPACT_SHARED_MASK}
PROFILE_NAMES = {v: k for k, v in PROFILES.items()}
#: compact profile: the noise's standard deviation is at most 1/COMPACT_NOISE_RATIO of an activation's
#: rounding error's (uniform in [-1/2, 1/2]: sqrt(1/12)), i.e. 1/16 of its variance. COMPACT_DELTA
#: leaves the fresh noise half of that variance and the output modulus switch the other half.
COMPACT_NOISE_RATIO = 4


def _compact_delta(fresh_var: float) -> int:
    """The compact profile's scale for an upload whose noise has variance proxy ``fresh_var`` per coefficient."""
    return math.ceil(math.sqrt(2.0) * COMPACT_NOISE_RATIO * math.sqrt(fresh_var) / math.sqrt(1.0 / 12.0))


COMPACT_DELTA = _compact_delta(ETA / 2.0)
#: the compact profile reserves this many times the noise's tail bound in q, so that the wider
#: output words of row chunks (Params.with_row_parts) still fit beside delta * y
COMPACT_ROOM = 4
#: most low bits a client drops from an uploaded word (module docstring): its dither is the 16 bits
#: of each noise word that the binomial sample leaves unused (kernels.finish_encrypt)
MAX_DROP_BITS = 16


def fresh_variance(eta: int, drop: int = 0) -> float:
    """Variance proxy, per input coefficient, of the noise an upload carries: the binomial's eta/2,
    plus the stochastic rounding's (2^drop / 2)^2 when ``drop`` low bits were dropped."""
    return eta / 2.0 + (4.0 ** (drop - 1) if drop > 0 else 0.0)


def _dropped(log_q: int, in_bits: int) -> int:
    """Bits an upload of ``in_bits``-bit words drops from ``log_q`` (``in_bits`` 0: none)."""
    return log_q - in_bits if in_bits else 0


def wire_bytes(tokens: int, n: int, features: int, real_bytes: float, pad_bytes: int = 0) -> float:
    """Bytes of the words of `tokens` tokens x `features` in ring blocks of `n`: `real_bytes` per
    value of a real token, `pad_bytes` per value of a padding slot of the last block (ciphertext.py:
    a padding token's B word never travels, the mask product's A'' word does)."""
    slots = -(-tokens // n) * n
    return features * (tokens * real_bytes + (slots - tokens) * pad_bytes)


#: rows of a weight matrix widened at a time when its norms are taken
_SLAB_ROWS = 256


@dataclass(frozen=True)
class WeightStats:
    """The norms of a weight matrix that bound noise growth and output size.

    Norms are taken over the contraction axis: per output column for ``x @ w``, per row of ``w``
    for the transposed product ``g @ w.T``.
    """

    l1: int  # max over outputs of sum |w|: bounds |y| and the provider's limb products
    l2sq: int  # max over outputs of sum w^2: bounds the noise sum_j w_j e_j

    @classmethod
    def of(cls, w: torch.Tensor, *, transpose: bool = False) -> "WeightStats":
        """Norms of ``w`` (d_in x d_out) for ``x @ w``, or of its rows for ``g @ w.T``."""
        if w.ndim != 2 or w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
            raise ParameterError(f"weights must be a 2-D integer tensor, got {tuple(w.shape)} {w.dtype}")
        if not w.numel():
            return cls(l1=1, l2sq=1)
        # A slab of rows at a time, widened to int64: a layer-sized int64 copy would cost a node
        # 8 bytes per weight while it loads a checkpoint
        l1_cols = torch.zeros(w.shape[1], dtype=torch.int64)
        l2_cols = torch.zeros(w.shape[1], dtype=torch.int64)
        l1 = l2sq = 0
        for start in range(0, w.shape[0], _SLAB_ROWS):
            absolute = w[start : start + _SLAB_ROWS].to(torch.int64, copy=True).abs_()  # never w itself
            if transpose:  # per row of w
                l1 = max(l1, int(absolute.sum(dim=1).max()))
                l2sq = max(l2sq, int(absolute.mul_(absolute).sum(dim=1).max()))
            else:  # per column of w, summed over the slabs
                l1_cols += absolute.sum(dim=0)
                l2_cols += absolute.mul_(absolute).sum(dim=0)
        if not transpose:
            l1, l2sq = int(l1_cols.max()), int(l2_cols.max())
        return cls(l1=max(l1, 1), l2sq=max(l2sq, 1))

    def covers(self, other: "WeightStats") -> bool:
        """True when parameters made for ``self`` are exact for weights with norms ``other``."""
        return other.l1 <= self.l1 and other.l2sq <= self.l2sq


@dataclass(frozen=True)
class Params:
    """Parameters of one layer's encryption; validated on construction (never insecure, never inexact)."""

    n: int  # ring degree: tokens per ciphertext block
    log_q: int  # q = 2^log_q, so reduction mod q is a wrap of 64-bit words
    delta: int  # plaintext scale: b = a*s + delta*m + e
    x_bits: int  # activations are signed integers in [-2^(x_bits-1), 2^(x_bits-1) - 1]
    w_l1: int  # weights' max column L1 norm these parameters are exact for
    w_l2sq: int  # weights' max column squared L2 norm these parameters are exact for
    out_bits_a: int  # provider rounds A' = A @ W to this many bits (== log_q: no switch; 0: shared mask)
    out_bits_b: int  # provider rounds B' = B @ W to this many bits
    row_parts: int = 1  # contraction-row chunks whose outputs the client adds before decrypting
    eta: int = ETA  # centred binomial noise parameter
    profile: int = DEFAULT  # PROFILES' flags: SHARED_MASK (one mask per block, a secret per feature), COMPACT
    in_bits: int = 0  # bits of an uploaded word: the client rounds b from log_q bits (shared mask); 0: log_q

    def __post_init__(self) -> None:
        if isinstance(self.in_bits, int) and self.in_bits == 0 and isinstance(self.log_q, int):
            object.__setattr__(self, "in_bits", self.log_q)
        for name in self.FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ParameterError(f"{name} must be an int, got {type(v).__name__}")
        check_secure(self.n, self.log_q)
        if not 2 <= self.x_bits <= MAX_X_BITS:
            raise ParameterError(f"x_bits must be in [2, {MAX_X_BITS}], got {self.x_bits}")
        if self.eta < ETA:
            raise ParameterError(f"noise eta must be >= {ETA} (std >= 3.2 as the security table assumes)")
        if self.w_l1 < 1 or self.w_l2sq < 1 or self.row_parts < 1:
            raise ParameterError("weight norms and row_parts must be >= 1")
        if self.profile not in PROFILES.values():
            raise ParameterError(f"unknown profile {self.profile}; known: {PROFILES}")
        low_a = 0 if self.shared_mask else 1
        high_a = 0 if self.shared_mask else self.log_q
        if not self.log_q - min(MAX_DROP_BITS, self.log_q - 1) <= self.in_bits <= self.log_q:
            raise ParameterError(f"in_bits must be in [log_q - {MAX_DROP_BITS}, log_q], got {self.in_bits} with log_q {self.log_q}")
        if self.in_bits < self.log_q and not self.shared_mask:
            raise ParameterError("only the shared-mask profiles round uploaded words (in_bits < log_q)")
        if not low_a <= self.out_bits_a <= high_a or not 1 <= self.out_bits_b <= self.in_bits:
            raise ParameterError("output bits must be in [1, log_q] (out_bits_a = 0 exactly for the shared-mask profile, "
                                 "out_bits_b <= in_bits)")
        if self.delta < (COMPACT_DELTA if self.compact else 2):
            raise ParameterError(f"delta must be >= {COMPACT_DELTA if self.compact else 2}")
        # exact: the noise is rounded away under delta/2, so delta * y alone must fit; compact: the
        # noise stays in the value, so it must fit too
        held = self.delta * (2 * self.y_max + 1) + (2 * math.ceil(self.noise_bound) if self.compact else 0)
        if held > self.q:
            raise ParameterError(f"inexact parameters: delta * (2*max|y| + 1) (+ noise) = {held} exceeds q = 2^{self.log_q}")
        if self.decoded_bound >= 1 << ROUND_BITS:
            raise ParameterError(f"delta = {self.delta} is too small for q = 2^{self.log_q}: decoded values would reach 2^{ROUND_BITS}")
        if not self._fits(self.out_bits_a, self.out_bits_b, self.row_parts):
            raise ParameterError(
                f"inexact parameters: the noise (bound {self.noise_bound:.4g}) exceeds the {PROFILE_NAMES[self.profile]} profile's budget"
            )

    @property
    def q(self) -> int:
        return 1 << self.log_q

    @property
    def y_max(self) -> int:
        """Largest |x @ w| value these parameters can decode exactly."""
        return (1 << (self.x_bits - 1)) * self.w_l1

    @property
    def compact(self) -> bool:
        """Whether decoding is approximate (the compact profiles): values carry noise in their low bits."""
        return bool(self.profile & COMPACT)

    @property
    def shared_mask(self) -> bool:
        """Whether a block has one mask and a secret per feature (the shared-mask profiles): no A'."""
        return bool(self.profile & SHARED_MASK)

    def _fits(self, out_bits_a: int, out_bits_b: int, parts: int, *, one_limb: bool = False) -> bool:
        return noise_fits(self.profile, self.n, self.log_q, self.eta, self.w_l2sq, self.delta, out_bits_a, out_bits_b, parts,
                          one_limb=one_limb, in_bits=self.in_bits)

    @property
    def decoded_error(self) -> float:
        """Bound on |decoded - x @ w| per value (failing with probability < 2**-FAILURE_LOG2): 0 when
        exact; in the compact profile the noise over delta plus the decoding's rounding."""
        return self.check_tolerance(self.w_l2sq, 1.0) if self.compact else 0.0

    @property
    def decoded_bound(self) -> int:
        """Largest |y| that decryption can output at all (honest or not): bounds a cheater's error."""
        return self.q // (2 * self.delta) + 1

    @property
    def noise_bound(self) -> float:
        """Bound on decryption noise that fails with probability < 2**-FAILURE_LOG2."""
        return noise_bound(self.n, self.log_q, self.eta, self.w_l2sq, self.out_bits_a, self.out_bits_b, self.row_parts,
                           in_bits=self.in_bits)

    @property
    def decrypt_one_limb(self) -> bool:
        """Whether decryption may take the faster one-limb product, its error still inside the budget."""
        return 0 < self.out_bits_a and one_limb_fits(self.n, self.out_bits_a) and self._fits(
            self.out_bits_a, self.out_bits_b, self.row_parts, one_limb=True)

    @property
    def rounded(self) -> bool:
        """Whether the upload is rounded to ``in_bits`` (module docstring); its words then travel at
        exactly ``in_bits`` bits each, not in whole bytes (ciphertext.py)."""
        return self.in_bits < self.log_q

    @property
    def in_bytes(self) -> float:
        """Bytes per input word on the wire: a fraction when words are packed at their bit width."""
        return self.in_bits / 8 if self.rounded else (self.log_q + 7) // 8

    @property
    def out_bytes(self) -> int:
        """Bytes per output value on the wire: A'' and B'' packed in one word when they fit 64 bits,
        else a word each (ciphertext.py)."""
        ka, kb = self.out_bits_a, self.out_bits_b
        return (ka + kb + 7) // 8 if ka + kb <= 64 else (ka + 7) // 8 + (kb + 7) // 8

    @property
    def pad_bytes(self) -> int:
        """Bytes per output value of a padding token: its A'' word alone (nothing in the shared mask)."""
        return (self.out_bits_a + 7) // 8

    def check_tolerance(self, wr_l2sq: float, r_l1: float) -> float:
        """Bound on |sum_k r_k (decoded_k - y_k)| over a row of a compact-profile product, for check
        weights r >= 0 with sum ``r_l1`` and ``||w @ r||_2^2 = wr_l2sq`` (see :func:`noise_bound`):
        the noise over delta plus each value's decoding rounding (at most 1/2). The one-limb
        decryption's error is always counted: a row chunk's wider output words (with_row_parts)
        may take the one-limb path where these parameters' own do not, and its error is no larger."""
        bound = noise_bound(self.n, self.log_q, self.eta, wr_l2sq, self.out_bits_a, self.out_bits_b, self.row_parts,
                            one_limb=self.out_bits_a > 0, weight=r_l1, in_bits=self.in_bits)
        return bound / self.delta + 0.5 * r_l1

    def payload_bytes(self, tokens: int, features: int) -> int:
        """Words a ciphertext of `tokens` x `features` puts on the wire: its real tokens' B words
        (bit-packed, a rounded upload's full blocks and its last block's tokens are two fields,
        each padded to a whole byte: ciphertext.py)."""
        if not self.rounded:
            return int(wire_bytes(tokens, self.n, features, int(self.in_bytes)))
        blocks = -(-tokens // self.n)
        last = tokens - (blocks - 1) * self.n
        return bit_bytes(self.in_bits, (blocks - 1) * self.n * features) + bit_bytes(self.in_bits, last * features)

    def result_bytes(self, tokens: int, width: int) -> int:
        """Words the product of such a ciphertext puts on the wire (ciphertext.py has the layout)."""
        return int(wire_bytes(tokens, self.n, width, self.out_bytes, self.pad_bytes))

    def for_weights(self, stats: WeightStats) -> None:
        """Raise :class:`ParameterError` unless these parameters hold for weights with ``stats``."""
        if not WeightStats(self.w_l1, self.w_l2sq).covers(stats):
            raise ParameterError(
                f"parameters were chosen for weights with column L1 <= {self.w_l1} and L2^2 <= {self.w_l2sq}; "
                f"these weights have {stats.l1} and {stats.l2sq}: the result would be inexact"
            )

    def with_row_parts(self, parts: int) -> "Params":
        """The same key material, with output bits that stay within the noise budget when ``parts``
        row chunks are added."""
        a, b = _min_out_bits(self.n, self.log_q, self.eta, self.w_l2sq, self.delta, parts, self.profile, self.in_bits)
        return replace(self, row_parts=parts, out_bits_a=a, out_bits_b=b)

    # Wire form: a fixed tuple of ints, so every implementation encodes parameters the same way. The
    # last, in_bits, is left out when it equals log_q: unrounded parameters keep the 11 words that
    # nodes predating rounded uploads read.
    FIELDS = ("n", "log_q", "delta", "x_bits", "w_l1", "w_l2sq", "out_bits_a", "out_bits_b", "row_parts", "eta", "profile",
              "in_bits")

    def to_tuple(self) -> tuple[int, ...]:
        values = tuple(getattr(self, f) for f in self.FIELDS)
        return values[:-1] if self.in_bits == self.log_q else values

    @classmethod
    def from_tuple(cls, values: tuple[int, ...]) -> "Params":
        if len(values) not in (len(cls.FIELDS) - 1, len(cls.FIELDS)):
            raise ParameterError(f"expected {len(cls.FIELDS) - 1} or {len(cls.FIELDS)} parameter fields, got {len(values)}")
        if len(values) == len(cls.FIELDS) and values[-1] == values[1]:
            raise ParameterError("in_bits equal to log_q is sent as 11 fields, not 12")  # one encoding per value
        return cls(**dict(zip(cls.FIELDS, (int(v) for v in values))))


def noise_bound(
    n: int, log_q: int, eta: int, w_l2sq: float, out_bits_a: int, out_bits_b: int, parts: int = 1, *,
    one_limb: bool = False, weight: float = 1.0, in_bits: int = 0,
) -> float:
    """Tail bound on |noise| after matmul, output modulus switch and the sum of ``parts`` row chunks.

    Fresh noise is sub-Gaussian with variance proxy (eta/2) * ||w||_2^2 (the row chunks partition the
    same sum), more when the upload was rounded to ``in_bits`` (:func:`fresh_variance`). Rounding A' to out_bits_a leaves eps in [-c_a, c_a] per coefficient, independent
    across coefficients because A is uniform; eps * s sums <= n such terms per chunk (Hoeffding), plus
    a rounding bias of at most 1/2 per term. Rounding B' adds at most c_b per chunk. Decryption's
    one-limb float64 product A'' * s adds its worst-case error (ring.fft_product_error), scaled to q.

    The same bound holds for a weighted sum of a row's values, ``sum_k r_k noise_k`` with r >= 0:
    pass ``w_l2sq = ||w @ r||_2^2`` (the fresh noise is then ``sum_j e_j (w @ r)_j``, exactly) and
    ``weight = sum_k r_k``, which scales every other term as if the columns' rounding errors were
    equal, the worst case (two equal columns of w round alike).
    """
    switched_a = 0 < out_bits_a < log_q  # out_bits_a == 0: shared mask, no A' on the wire
    c_a = float(2 ** (log_q - out_bits_a - 1)) if switched_a else 0.0
    c_b = float(2 ** (log_q - out_bits_b - 1)) if out_bits_b < log_q else 0.0
    bias = 0.5 * n * parts if switched_a else 0.0
    var = fresh_variance(eta, _dropped(log_q, in_bits)) * w_l2sq + parts * n * (c_a * weight) ** 2
    fft = fft_product_error(n, out_bits_a) * 2.0 ** (log_q - out_bits_a) if one_limb else 0.0
    return TAIL * math.sqrt(var) + (bias + parts * c_b + fft) * weight


def noise_std(n: int, log_q: int, eta: int, w_l2sq: int, out_bits_a: int, out_bits_b: int, parts: int = 1, *,
              one_limb: bool = False, in_bits: int = 0) -> float:
    """The decryption noise's standard deviation (what a value's accuracy sees; :func:`noise_bound` is
    its tail), plus its deterministic terms: fresh noise (variance eta/2 per e_j, and at most the
    proxy of a rounded upload's error, :func:`fresh_variance`), A''s rounding
    (uniform in [-c_a, c_a], variance c_a^2 / 3, times the 2/3 of a ternary key's coefficients that
    are not zero, n per value and chunk), B''s rounding (c_b^2 / 3 per chunk), and at most the
    rounding bias and the one-limb product's error."""
    switched_a = 0 < out_bits_a < log_q
    c_a = float(2 ** (log_q - out_bits_a - 1)) if switched_a else 0.0
    c_b = float(2 ** (log_q - out_bits_b - 1)) if out_bits_b < log_q else 0.0
    var = fresh_variance(eta, _dropped(log_q, in_bits)) * w_l2sq + parts * n * (2.0 / 3.0) * c_a * c_a / 3.0 + parts * c_b * c_b / 3.0
    bias = 0.5 * n * parts if switched_a else 0.0
    fft = fft_product_error(n, out_bits_a) * 2.0 ** (log_q - out_bits_a) if one_limb else 0.0
    return math.sqrt(var) + bias + fft


def noise_fits(profile: int, n: int, log_q: int, eta: int, w_l2sq: int, delta: int, out_bits_a: int, out_bits_b: int,
               parts: int, *, one_limb: bool = False, in_bits: int = 0) -> bool:
    """Whether the noise stays within the profile's budget: below delta/2 with probability
    1 - 2**-FAILURE_LOG2 (exact decoding), or, compact, a standard deviation of at most
    1/COMPACT_NOISE_RATIO of the activations' rounding error's (module docstring)."""
    if profile & COMPACT:
        rounding = delta * math.sqrt(w_l2sq / 12.0)  # x's rounding error in the scaled product
        return noise_std(n, log_q, eta, w_l2sq, out_bits_a, out_bits_b, parts, one_limb=one_limb,
                         in_bits=in_bits) <= rounding / COMPACT_NOISE_RATIO
    return noise_bound(n, log_q, eta, w_l2sq, out_bits_a, out_bits_b, parts, one_limb=one_limb, in_bits=in_bits) < delta / 2


def _min_out_bits(n: int, log_q: int, eta: int, w_l2sq: int, delta: int, parts: int, profile: int,
                  in_bits: int = 0) -> tuple[int, int]:
    """Output bits (ka, kb) whose noise fits the profile's budget (:func:`noise_fits`), best first
    by: fewest wire bytes, then the one-limb decryption being admissible (half the client's
    decryption FFTs), then fewest bits. The shared-mask profile returns no A' (ka = 0)."""
    best: tuple[tuple[int, bool, int], tuple[int, int]] | None = None
    for kb in range(1, (in_bits or log_q) + 1):
        for ka in (0,) if profile & SHARED_MASK else range(1, log_q + 1):
            if noise_fits(profile, n, log_q, eta, w_l2sq, delta, ka, kb, parts, in_bits=in_bits):
                fast = 0 < ka and one_limb_fits(n, ka) and noise_fits(profile, n, log_q, eta, w_l2sq, delta, ka, kb, parts,
                                                                      one_limb=True, in_bits=in_bits)
                key = ((ka + kb + 7) // 8, not fast, ka + kb)
                if best is None or key < best[0]:
                    best = (key, (ka, kb))
    if best is None:
        raise ParameterError(f"no output modulus keeps {parts} row chunks within the noise budget; use fewer row chunks")
    return best[1]


def _compact_room(fresh_var: float, w_l2sq: int, n: int, delta: int) -> int:
    """Room to reserve in q beside delta * y for the compact profile's noise: COMPACT_ROOM times the
    largest tail bound (:func:`noise_bound`) of any output bits that fit its budget, whose rounding
    variance is then at most S^2 = (delta sqrt(w_l2sq / 12) / COMPACT_NOISE_RATIO)^2: n c_a^2 <= 4.5 S^2
    and c_b <= sqrt(3) S; both sides of zero."""
    s = delta * math.sqrt(w_l2sq / 12.0) / COMPACT_NOISE_RATIO
    tail = TAIL * math.sqrt(fresh_var * w_l2sq + 4.5 * s * s) + 0.5 * n + math.sqrt(3.0) * s
    return 2 * math.ceil(COMPACT_ROOM * tail)


def choose_params(
    stats: WeightStats,
    x_bits: int,
    *,
    n: int | None = None,
    switch_output: bool = True,
    row_parts: int = 1,
    profile: str = "default",
) -> Params:
    """Smallest secure parameters for weights with ``stats`` and ``x_bits``-bit activations: exact,
    or approximate within the compact profile's noise (module docstring).

    Exact: delta is first sized so the fresh noise takes at most a quarter of the decoding margin.
    Compact: delta starts at COMPACT_DELTA. q is the next power of two that holds
    delta * (2 max|y| + 1) (plus the noise's room, compact: :func:`_compact_room`), and delta then
    grows to fill q (free margin for the output modulus switch, or less noise per decoded value).
    N is the smallest tabulated degree (>= ``n`` if given) whose 128-bit bound admits q. The
    shared-mask profiles also round the upload (module docstring): of every number of dropped bits
    whose output words are no wider in bytes than without rounding (a download is never made
    dearer for it), the one with the fewest bits per uploaded word, then the smallest N, then the
    fewest bytes and bits per output value, then the fewest dropped.
    """
    if not isinstance(x_bits, int) or not 2 <= x_bits <= MAX_X_BITS:
        raise ParameterError(f"x_bits must be an int in [2, {MAX_X_BITS}], got {x_bits!r}")
    if profile not in PROFILES:
        raise ParameterError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    flags = PROFILES[profile]
    if not flags & SHARED_MASK:
        return _params_dropping(stats, x_bits, n, switch_output, row_parts, flags, 0)
    found: list[Params] = []
    error: ParameterError | None = None
    for drop in range(MAX_DROP_BITS + 1):
        try:
            found.append(_params_dropping(stats, x_bits, n, switch_output, row_parts, flags, drop))
        except ParameterError as exc:  # q past 64 bits, or past the table for a fixed n
            error = error or exc
    if not found:
        assert error is not None
        raise error
    plain = found[0].out_bytes if found[0].in_bits == found[0].log_q else math.inf  # not rounded
    return min(found, key=lambda p: (p.out_bytes > plain, p.in_bits, p.n, p.out_bytes, p.out_bits_b, p.log_q - p.in_bits))


def _params_dropping(stats: WeightStats, x_bits: int, n: int | None, switch_output: bool, row_parts: int, flags: int,
                     drop: int) -> Params:
    """choose_params for an upload rounded by ``drop`` bits (0: not rounded)."""
    compact = bool(flags & COMPACT)
    fresh = fresh_variance(ETA, drop)
    y_max = (1 << (x_bits - 1)) * stats.l1
    if compact:
        delta_min = _compact_delta(fresh)
        room = partial(_compact_room, fresh, stats.l2sq)
    else:  # the noise is rounded away: it takes no room beside delta * y
        delta_min = max(2, math.floor(4 * TAIL * math.sqrt(fresh * stats.l2sq)) + 1)
        room = lambda _n, _delta: 0  # noqa: E731
    log_q = max(drop + 1, math.ceil(math.log2(delta_min * (2 * y_max + 1))))
    while True:
        if log_q > WORD_BITS:
            raise ParameterError(
                f"this layer needs log2(q) = {log_q} > {WORD_BITS} for {x_bits}-bit activations "
                f"(max |y| = {y_max}); lower x_bits or split the contraction rows"
            )
        ring_n = smallest_secure_n(log_q, min_n=n or 1024)
        if delta_min * (2 * y_max + 1) + room(ring_n, delta_min) <= 1 << log_q:
            break
        log_q += 1
    if n is not None and ring_n != n:
        check_secure(n, log_q)  # raises with the table's explanation
    delta = (1 << log_q) // (2 * y_max + 1)
    while delta * (2 * y_max + 1) + room(ring_n, delta) > 1 << log_q:  # compact: a few steps down
        delta = ((1 << log_q) - room(ring_n, delta)) // (2 * y_max + 1)
    in_bits = log_q - drop
    if switch_output:
        out_a, out_b = _min_out_bits(ring_n, log_q, ETA, stats.l2sq, delta, row_parts, flags, in_bits)
    else:
        out_a, out_b = (0 if flags & SHARED_MASK else log_q), in_bits
    return Params(
        n=ring_n, log_q=log_q, delta=delta, x_bits=x_bits, w_l1=stats.l1, w_l2sq=stats.l2sq,
        out_bits_a=out_a, out_bits_b=out_b, row_parts=row_parts, profile=flags, in_bits=in_bits,
    )
