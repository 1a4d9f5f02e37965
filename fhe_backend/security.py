"""The 128-bit security table for RLWE with ternary secrets.

Source: HomomorphicEncryption.org Security Standard (Albrecht et al., 2018), Table 1, classical
128-bit security, secret distribution uniform ternary, error standard deviation ~3.2. For each ring
degree N the table gives the largest log2(q) that keeps 128-bit security. Our noise is a centred
binomial with eta = 24 (std 3.46 >= 3.2), so the table applies as is.
"""

from __future__ import annotations

from .errors import ParameterError

#: ring degree N -> largest log2(q) with 128-bit classical security (uniform ternary secret)
MAX_LOG_Q_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: q must fit machine words: reduction mod q = 2^k is then a free wrap of uint64/int64 arithmetic.
WORD_BITS = 64


def check_secure(n: int, log_q: int) -> None:
    """Raise :class:`ParameterError` unless (N, log2 q) is inside the 128-bit table and fits a word."""
    if n not in MAX_LOG_Q_128:
        raise ParameterError(f"ring degree N={n} is not in the 128-bit table {sorted(MAX_LOG_Q_128)}")
    if not 1 <= log_q <= WORD_BITS:
        raise ParameterError(f"log2(q)={log_q} must be in [1, {WORD_BITS}]")
    limit = MAX_LOG_Q_128[n]
    if log_q > limit:
        raise ParameterError(
            f"insecure parameters: N={n} allows log2(q) <= {limit} for 128-bit security, got {log_q}; "
            "use a larger N or fewer activation bits"
        )


def smallest_secure_n(log_q: int, *, min_n: int = 1024) -> int:
    """Smallest tabulated N >= min_n whose 128-bit bound admits log2(q)."""
    for n in sorted(MAX_LOG_Q_128):
        if n >= min_n and log_q <= MAX_LOG_Q_128[n]:
            return n
    raise ParameterError(f"no tabulated ring degree admits log2(q)={log_q}")
