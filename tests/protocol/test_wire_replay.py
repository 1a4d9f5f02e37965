"""Freshness: the replay window on its own, and replayed or expired frames through verify_request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_factory import NOW_MS, OTHER_KEY, PAYLOAD, accept, make_request, request_frame

from cipherswarm.protocol import BadSignature, Busy, ExpiredFrame, ReplayedFrame, ReplayWindow, encode_frame, seal

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
