"""Freshness: the replay window on its own, and replayed or expired frames through verify_request."""

from __future__ import annotations

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

NONCE = b"n" * 16


class TestReplayWindow:
    def test_nonce_accepted_once(self) -> None:
        window = ReplayWindow()
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS)
        with pytest.raises(ReplayedFrame) as caught:
            window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS + 5)
        assert caught.value.nonce == NONCE

    def test_scopes_are_separate(self) -> None:
        window = ReplayWindow()
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"a")
        window.check_and_record(NONCE, expires_at_ms=NOW_MS + 10, now_ms=NOW_MS, scope=b"b")

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
        window.check_and_record(b"c" * 16, expires_at_ms=NOW_MS + 200, now_ms=NOW_MS + 50)

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
    def test_never_accepts_a_live_nonce_twice_and_stays_bounded(self, steps: list[tuple[int, int, int]]) -> None:
        window = ReplayWindow(capacity=4, max_ttl_ms=30)
        accepted: dict[bytes, int] = {}  # unbounded reference: nonce -> expiry of its accepted frame
        now = NOW_MS
        for nonce_index, offset, step in steps:
            now += step
            nonce = bytes([nonce_index]) * 16
            try:
                window.check_and_record(nonce, expires_at_ms=now + offset, now_ms=now)
            except (ExpiredFrame, ReplayedFrame, Busy):
                pass
            else:
                assert accepted.get(nonce, now) <= now, "a nonce was accepted while its frame was live"
                accepted[nonce] = now + offset
            assert len(window) <= window.capacity


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
    def test_shares_never_exceeded_and_no_live_nonce_accepted_twice(self, steps: list[tuple[int, int, int, int]]) -> None:
        window = ReplayWindow(capacity=6, max_ttl_ms=30, per_scope=3, per_group=4)
        accepted: dict[tuple[bytes, bytes], int] = {}  # unbounded reference: (scope, nonce) -> expiry
        now = NOW_MS
        for scope_index, nonce_index, offset, step in steps:
            now += step
            scope, nonce, group = bytes([scope_index]), bytes([nonce_index]) * 16, bytes([scope_index // 2])
            live = {k: e for k, e in accepted.items() if e > now}
            try:
                window.check_and_record(nonce, expires_at_ms=now + offset, now_ms=now, scope=scope, group=group)
            except ReplayedFrame:
                assert (scope, nonce) in live
            except Busy:
                in_scope = sum(1 for (s, _) in live if s == scope)
                in_group = sum(1 for (s, _) in live if s[0] // 2 == scope_index // 2)
                assert in_scope >= 3 or in_group >= 4 or len(live) >= 6
            except ExpiredFrame:
                pass
            else:
                assert (scope, nonce) not in live, "a nonce was accepted while its frame was live"
                accepted[(scope, nonce)] = now + offset
            live = {k: e for k, e in accepted.items() if e > now}
            assert len(live) <= len(window) <= 6  # expired nonces are forgotten lazily, on the next check
            for s in range(4):
                assert sum(1 for (k, _) in live if k == bytes([s])) <= window.held(scope=bytes([s])) <= 3
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
        accept(request_frame()[1], window=window)  # an acceptable request still finds room

    def test_a_bad_signature_leaves_the_window_empty(self) -> None:
        window = ReplayWindow(capacity=1)
        sealed, _ = request_frame()
        forged = encode_frame(seal(sealed.message, OTHER_KEY), PAYLOAD)  # OTHER's signature on CLIENT's stream
        with pytest.raises(BadSignature):
            check_request_header(decode_frame(forged, limits=LIMITS).header, peer=CLIENT, window=window,
                                 lookup=lookup, now_ms=NOW_MS)
        assert len(window) == 0

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
        with pytest.raises(Busy):
            accept(request_frame()[1], window=window)
        other = make_request()
        check_request_header(decode_frame(encode_frame(seal(other, OTHER_KEY), PAYLOAD), limits=LIMITS).header,
                             peer=seal(other, OTHER_KEY).signer, window=window, lookup=lookup, now_ms=NOW_MS)
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
        _, data = request_frame()
        with pytest.raises(ExpiredFrame):
            accept(data, now_ms=now_ms)

    def test_frame_expiring_too_far_ahead_refused(self) -> None:
        _, data = request_frame(expires_at_ms=NOW_MS + 10 * 60_000)
        with pytest.raises(ExpiredFrame):
            accept(data)

    def test_forged_frame_does_not_use_up_the_nonce(self) -> None:
        window = ReplayWindow()
        sealed, data = request_frame()
        forged = seal(sealed.message, OTHER_KEY)  # same nonce, someone else's signature
        with pytest.raises(BadSignature):
            accept(encode_frame(forged, PAYLOAD), window=window)
        accept(data, window=window)

    def test_fresh_requests_differ_in_nonce_and_id(self) -> None:
        first, second = make_request(), make_request()
        assert first.nonce != second.nonce and first.request_id != second.request_id
