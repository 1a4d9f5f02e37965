"""Freshness: the replay window on its own, and replayed or expired frames through verify_request."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_factory import (
    CLIENT,
    LIMITS,
    NOW_MS,
    OTHER_KEY,
    PAYLOAD,
    accept,
    lookup,
    make_request,
    request_frame,
)

from cipherswarm.protocol import (
    BadSignature,
    Busy,
    ExpiredFrame,
    PaymentRequired,
    ProtocolError,
    Range,
    ReplayedFrame,
    ReplayWindow,
    ShapeMismatch,
    UnknownModel,
    WeightSlice,
    decode_frame,
    encode_frame,
    seal,
)
from cipherswarm.protocol.exchange import check_request_header, check_request_payload
from cipherswarm.protocol.replay import DEFAULT_MAX_TTL_MS

NONCE = b"n" * 16


@dataclass
class Reference:
    """The window's rules applied to an unbounded record of accepted nonces: the outcome each check
    must have, so that a property test can hold every refusal to its exact error."""

    capacity: int
    max_ttl_ms: int
    per_scope: int
    per_group: int
    live: dict[tuple[bytes, bytes], tuple[int, bytes | None]] = field(default_factory=dict)  # -> (expiry, group)

    def check(self, nonce: bytes, *, expires_at_ms: int, now_ms: int, scope: bytes = b"",
              group: bytes | None = None) -> tuple[type[ProtocolError], int | None] | None:
        """None if the nonce must be accepted (and records it), else the error and, for Busy, the
        retry hint: when the oldest live nonce of the full share or window expires."""
        if not now_ms < expires_at_ms <= now_ms + self.max_ttl_ms:
            return ExpiredFrame, None
        self.live = {key: held for key, held in self.live.items() if held[0] > now_ms}
        if (scope, nonce) in self.live:
            return ReplayedFrame, None
        shares = (
            ([e for (s, _), (e, _) in self.live.items() if s == scope], self.per_scope),
            ([e for e, g in self.live.values() if group is not None and g == group], self.per_group),
            ([e for e, _ in self.live.values()], self.capacity),
        )
        for expiries, limit in shares:
            if len(expiries) >= limit:
                return Busy, min(expiries) - now_ms
        self.live[(scope, nonce)] = (expires_at_ms, group)
        return None


def check_against(reference: Reference, window: ReplayWindow, nonce: bytes, *, expires_at_ms: int, now_ms: int,
                  scope: bytes = b"", group: bytes | None = None) -> None:
    """``window.check_and_record`` has exactly the outcome ``reference`` gives for the same call."""
    expected = reference.check(nonce, expires_at_ms=expires_at_ms, now_ms=now_ms, scope=scope, group=group)
    try:
        window.check_and_record(nonce, expires_at_ms=expires_at_ms, now_ms=now_ms, scope=scope, group=group)
    except ProtocolError as exc:
        assert expected is not None, f"refused with {exc!r}, should be accepted"
        assert type(exc) is expected[0], f"refused with {exc!r}, should be {expected[0].__name__}"
        if isinstance(exc, Busy):
            assert exc.retry_after_ms == expected[1]
    else:
        assert expected is None, f"accepted, should be refused with {expected[0].__name__}"
    assert len(reference.live) <= len(window) <= window.capacity  # expired nonces are forgotten lazily


class TestReplayWindow:
    def test_nonce_accepted_once(self) -> None:
        window = ReplayWindow()
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS)
        with pytest.raises(ReplayedFrame) as caught:
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS + 5)
        assert caught.value.nonce == NONCE
        assert len(window) == 1

    def test_scopes_are_separate(self) -> None:
        window = ReplayWindow()
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"a")
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"b")
        assert (len(window), window.held(scope=b"a"), window.held(scope=b"b")) == (2, 1, 1)
        with pytest.raises(ReplayedFrame):  # each scope still remembers it
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"a")

    @pytest.mark.parametrize("expires_at_ms", [NOW_MS - 1, NOW_MS, NOW_MS + 1001])
    def test_expiry_outside_the_window_refused(self, expires_at_ms: int) -> None:
        window = ReplayWindow(max_ttl_ms=1000)
        with pytest.raises(ExpiredFrame) as caught:
            window.check_and_record(NONCE, expires_at_ms=expires_at_ms, now_ms=NOW_MS)
        assert (caught.value.expires_at_ms, caught.value.now_ms, caught.value.not_after_ms) == (
            expires_at_ms,
            NOW_MS,
            NOW_MS + 1000,
        )
        assert len(window) == 0

    def test_nonces_are_forgotten_once_expired(self) -> None:
        window = ReplayWindow()
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS)
        window.check_and_record(b"m" * 16, expires_at_ms=NOW_MS + 30, now_ms=NOW_MS + 10)
        assert len(window) == 1
        with pytest.raises(ExpiredFrame):  # the forgotten nonce's frame is refused anyway
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS + 10)

    def test_full_window_refuses_with_a_retry_hint_and_forgets_nothing(self) -> None:
        window = ReplayWindow(capacity=2)
        window.check_and_record(b"a" * 16, expires_at_ms=NOW_MS + 100, now_ms=NOW_MS)
        window.check_and_record(b"b" * 16, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS)
        with pytest.raises(Busy) as caught:
            window.check_and_record(b"c" * 16, expires_at_ms=NOW_MS + 200, now_ms=NOW_MS + 10)
        assert caught.value.retry_after_ms == 40
        with pytest.raises(ReplayedFrame):
            window.check_and_record(b"b" * 16, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS + 10)
        window.check_and_record(b"c" * 16, expires_at_ms=NOW_MS + 200, now_ms=NOW_MS + 50)  # b has expired
        assert len(window) == 2
        with pytest.raises(ReplayedFrame):
            window.check_and_record(b"c" * 16, expires_at_ms=NOW_MS + 200, now_ms=NOW_MS + 60)

    @pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"max_ttl_ms": 0}])
    def test_bounds_validated(self, kwargs: dict[str, int]) -> None:
        with pytest.raises(ValueError):
            ReplayWindow(**kwargs)

    @given(
        st.lists(
            st.tuples(st.integers(0, 7), st.integers(-5, 40), st.integers(0, 10)),  # nonce, expiry offset, clock step
            max_size=200,
        )
    )
    def test_every_outcome_is_the_references_and_memory_stays_bounded(self, steps: list[tuple[int, int, int]]) -> None:
        window = ReplayWindow(capacity=4, max_ttl_ms=30)
        reference = Reference(capacity=4, max_ttl_ms=30, per_scope=4, per_group=4)
        now = NOW_MS
        for nonce_index, offset, step in steps:
            now += step
            check_against(reference, window, bytes([nonce_index]) * 16, expires_at_ms=now + offset, now_ms=now)


class TestShares:
    """One signer (scope), or one address (group), cannot fill the window for everyone."""

    def test_a_full_share_refuses_its_scope_only(self) -> None:
        window = ReplayWindow(capacity=100, per_scope=3)
        for i in range(3):
            window.check_and_record(bytes([i]) * 16, expires_at_ms=NOW_MS + 100 + i, now_ms=NOW_MS, scope=b"greedy")
        with pytest.raises(Busy) as caught:
            window.check_and_record(b"x" * 16, expires_at_ms=NOW_MS + 100, now_ms=NOW_MS + 10, scope=b"greedy")
        assert caught.value.retry_after_ms == 90  # when its own oldest nonce expires
        assert "key's share" in str(caught.value)
        for i in range(3):  # another signer is unaffected
            window.check_and_record(bytes([i]) * 16, expires_at_ms=NOW_MS + 100, now_ms=NOW_MS + 10, scope=b"honest")
        assert (window.held(scope=b"greedy"), window.held(scope=b"honest"), len(window)) == (3, 3, 6)
        # its oldest nonce expires: its share has room for one more
        window.check_and_record(b"x" * 16, expires_at_ms=NOW_MS + 200, now_ms=NOW_MS + 100, scope=b"greedy")
        assert window.held(scope=b"greedy") == 3

    def test_a_full_group_share_refuses_that_group_only(self) -> None:
        window = ReplayWindow(capacity=100, per_scope=100, per_group=4)
        for i in range(4):  # four signers behind one address
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS, scope=bytes([i]), group=b"10.0.0.1")
        with pytest.raises(Busy) as caught:
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS, scope=b"fifth", group=b"10.0.0.1")
        assert "address's share" in str(caught.value) and caught.value.retry_after_ms == 50
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS, scope=b"fifth", group=b"10.0.0.2")
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 50, now_ms=NOW_MS, scope=b"sixth")  # counted in no group
        assert window.held(group=b"10.0.0.1") == 4 and len(window) == 6

    def test_the_whole_window_still_bounds_memory(self) -> None:
        window = ReplayWindow(capacity=4, per_scope=2)
        for scope in (b"a", b"b"):
            for nonce in (b"1" * 16, b"2" * 16):
                window.check_and_record(nonce, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=scope)
        with pytest.raises(Busy, match="replay window full"):
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"c")

    def test_shares_are_capped_at_the_capacity(self) -> None:
        window = ReplayWindow(capacity=2)
        assert (window.per_scope, window.per_group) == (2, 2)
        with pytest.raises(ValueError):
            ReplayWindow(per_scope=0)

    @given(
        st.lists(
            # scope, nonce, expiry offset, clock step
            st.tuples(st.integers(0, 3), st.integers(0, 7), st.integers(-5, 40), st.integers(0, 10)),
            max_size=300,
        )
    )
    def test_every_outcome_is_the_references_and_shares_are_never_exceeded(self, steps: list[tuple[int, int, int, int]]) -> None:
        window = ReplayWindow(capacity=6, max_ttl_ms=30, per_scope=3, per_group=4)
        reference = Reference(capacity=6, max_ttl_ms=30, per_scope=3, per_group=4)
        now = NOW_MS
        for scope_index, nonce_index, offset, step in steps:
            now += step
            scope, group = bytes([scope_index]), bytes([scope_index // 2])
            check_against(reference, window, bytes([nonce_index]) * 16, expires_at_ms=now + offset, now_ms=now,
                          scope=scope, group=group)
            for s in range(4):
                assert sum(1 for (k, _) in reference.live if k == bytes([s])) <= window.held(scope=bytes([s])) <= 3
            for g in range(2):
                assert window.held(group=bytes([g])) <= 4


class TestOnlyRequestsPassingTheCheapChecksUseANonce:
    """check_request_header records the nonce last: a request any cheaper check refuses leaves
    nothing in the window (README section 8), so refused requests cannot fill it."""

    @pytest.mark.parametrize(
        ("changes", "error"),
        [
            (dict(model_hash=b"x" * 32), UnknownModel),
            (dict(layer="model.layers.9.nope"), UnknownModel),
            (dict(weight_slice=WeightSlice(rows=Range(0, 16), cols=Range(40, 60))), ShapeMismatch),
            (dict(price_per_gmac=1), PaymentRequired),
            (dict(expires_at_ms=NOW_MS), ExpiredFrame),
        ],
    )
    def test_refused_requests_leave_the_window_empty(self, changes: dict[str, object], error: type[ProtocolError]) -> None:
        window = ReplayWindow(capacity=1)
        for _ in range(5):  # five times: a window of one nonce would be full after the first
            _, data = request_frame(**changes)
            with pytest.raises(error):
                check_request_header(decode_frame(data, limits=LIMITS).header, peer=CLIENT, window=window,
                                     lookup=lookup, now_ms=NOW_MS, min_price_per_gmac=100)
        assert len(window) == 0
        sealed, data = request_frame()  # an acceptable request still finds room
        assert accept(data, window=window).message == sealed.message
        assert len(window) == 1

    def test_a_bad_signature_leaves_the_window_empty(self) -> None:
        window = ReplayWindow(capacity=1)
        sealed, _ = request_frame()
        forged = encode_frame(seal(sealed.message, OTHER_KEY), PAYLOAD)  # OTHER's signature on CLIENT's stream
        with pytest.raises(BadSignature):
            check_request_header(decode_frame(forged, limits=LIMITS).header, peer=CLIENT, window=window,
                                 lookup=lookup, now_ms=NOW_MS)
        assert len(window) == 0
        assert check_request_header(decode_frame(request_frame()[1], limits=LIMITS).header, peer=CLIENT, window=window,
                                    lookup=lookup, now_ms=NOW_MS).signer == CLIENT
        assert len(window) == 1

    def test_the_header_is_checked_and_the_nonce_used_before_the_payload(self) -> None:
        window = ReplayWindow()
        sealed, data = request_frame()
        header = decode_frame(data, limits=LIMITS).header
        checked = check_request_header(header, peer=CLIENT, window=window, lookup=lookup, now_ms=NOW_MS)
        assert (checked.message, checked.payload, len(window)) == (sealed.message, b"", 1)
        with pytest.raises(BadSignature):  # the payload is not the one signed; the nonce stays used
            check_request_payload(checked, PAYLOAD[::-1])
        assert check_request_payload(checked, PAYLOAD).payload == PAYLOAD
        with pytest.raises(ReplayedFrame):
            check_request_header(header, peer=CLIENT, window=window, lookup=lookup, now_ms=NOW_MS + 1)

    def test_one_key_over_its_share_does_not_refuse_another(self) -> None:
        window = ReplayWindow(capacity=8, per_scope=2)
        for _ in range(2):
            accept(request_frame()[1], window=window)
        with pytest.raises(Busy, match="key's share"):
            accept(request_frame()[1], window=window)
        other = seal(make_request(), OTHER_KEY)
        checked = check_request_header(decode_frame(encode_frame(other, PAYLOAD), limits=LIMITS).header,
                                       peer=other.signer, window=window, lookup=lookup, now_ms=NOW_MS)
        assert (checked.signer, checked.message) == (other.signer, other.message)
        assert len(window) == 3


class TestThroughVerifyRequest:
    def test_replayed_frame_refused(self) -> None:
        window = ReplayWindow()
        sealed, data = request_frame()
        accept(data, window=window)
        with pytest.raises(ReplayedFrame) as caught:
            accept(data, window=window, now_ms=NOW_MS + 1)
        assert caught.value.nonce == sealed.message.nonce

    @pytest.mark.parametrize("now_ms", [NOW_MS + 30_000, NOW_MS + 60_000])
    def test_expired_frame_refused(self, now_ms: int) -> None:
        sealed, data = request_frame()
        with pytest.raises(ExpiredFrame) as caught:
            accept(data, now_ms=now_ms)
        assert (caught.value.expires_at_ms, caught.value.now_ms) == (sealed.message.expires_at_ms, now_ms)

    def test_frame_expiring_too_far_ahead_refused(self) -> None:
        _, data = request_frame(expires_at_ms=NOW_MS + 10 * 60_000)
        with pytest.raises(ExpiredFrame) as caught:
            accept(data)
        assert (caught.value.expires_at_ms, caught.value.not_after_ms) == (NOW_MS + 10 * 60_000, NOW_MS + DEFAULT_MAX_TTL_MS)

    def test_forged_frame_does_not_use_up_the_nonce(self) -> None:
        window = ReplayWindow()
        sealed, data = request_frame()
        forged = seal(sealed.message, OTHER_KEY)  # same nonce, someone else's signature
        with pytest.raises(BadSignature):
            accept(encode_frame(forged, PAYLOAD), window=window)
        assert len(window) == 0
        verified = accept(data, window=window)
        assert (verified.message, verified.signer, verified.payload) == (sealed.message, CLIENT, PAYLOAD)
        with pytest.raises(ReplayedFrame):  # the genuine frame used it
            accept(data, window=window, now_ms=NOW_MS + 1)

    def test_fresh_requests_differ_in_nonce_and_id(self) -> None:
        first, second = make_request(), make_request()
        assert first.nonce != second.nonce and first.request_id != second.request_id
