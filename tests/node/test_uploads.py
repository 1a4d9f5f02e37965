"""The upload gate: small requests together, big ones one at a time (or side by side up to a stated
uplink), first come first served."""

from __future__ import annotations

import pytest
import trio

from cipherswarm.node.client.uploads import UploadGate, Uploads

MB = 1 << 20


def admitted(gate: UploadGate, sizes: list[int]) -> list[int]:
    """Queue uploads of `sizes`; the indices admitted at once."""
    granted: list[int] = []
    for i, size in enumerate(sizes):
        gate.request(size, lambda i=i: granted.append(i))
    return granted


def test_small_uploads_share_the_link_up_to_the_slots() -> None:
    gate = UploadGate(slots=4, window_bytes=8 * MB)
    assert admitted(gate, [MB] * 6) == [0, 1, 2, 3]
    gate.release(MB)
    assert gate.active == 4 and gate.active_bytes == 4 * MB  # the fifth took the freed place


def test_big_uploads_go_one_at_a_time_and_in_order() -> None:
    gate = UploadGate(slots=4, window_bytes=8 * MB)
    granted = admitted(gate, [117 * MB, MB, 117 * MB])
    assert granted == [0]  # alone: the small one may not overtake the queue's order
    gate.release(117 * MB)
    assert granted == [0, 1]  # the small one is admitted; the big one behind it waits for the link
    gate.release(MB)
    assert granted == [0, 1, 2]


def test_a_withdrawn_request_lets_the_next_one_in() -> None:
    gate = UploadGate(slots=2, window_bytes=8 * MB)
    granted: list[str] = []
    gate.request(6 * MB, lambda: granted.append("a"))
    big = lambda: granted.append("big")  # noqa: E731
    gate.request(6 * MB, big)  # would overflow the window: waits
    gate.request(MB, lambda: granted.append("c"))
    assert granted == ["a"]
    assert gate.cancel(big) and granted == ["a", "c"]
    assert not gate.cancel(big)


def test_a_stated_uplink_admits_big_uploads_side_by_side_up_to_the_link() -> None:
    """1 Gbit/s of uplink, providers that each take 300 Mbit/s: three big uploads at once, not one."""
    gate = UploadGate(slots=4, window_bytes=8 * MB, uplink_bps=125e6)
    first = admitted(gate, [40 * MB])
    assert first == [0] and gate.link_share == 1  # nothing measured yet: one at a time, as without a rate
    gate.release(40 * MB, seconds=40 * MB / 37.5e6)  # written at 300 Mbit/s
    assert gate.link_share == 3
    assert admitted(gate, [40 * MB] * 5) == [0, 1, 2]
    for _ in range(3):  # three side by side on a saturated link: each measures a third of it
        gate.release(40 * MB, seconds=40 * MB / (125e6 / 3))
    assert gate.link_share == 3 and gate.active == 2  # stable: the two left in the queue got in, no more


def test_without_a_stated_uplink_measurements_change_nothing() -> None:
    gate = UploadGate(slots=4, window_bytes=8 * MB)
    assert admitted(gate, [40 * MB]) == [0]
    gate.release(40 * MB, seconds=1.0)
    assert gate.link_share == 1 and admitted(gate, [40 * MB] * 2) == [0]


def test_small_uploads_do_not_measure_the_link() -> None:
    """A request within the window is latency-bound: its rate says nothing of the link."""
    gate = UploadGate(slots=4, window_bytes=8 * MB, uplink_bps=125e6)
    admitted(gate, [MB])
    gate.release(MB, seconds=1.0)  # 1 MB/s would admit 119 big uploads if it counted
    assert gate.rate_bps == 0 and gate.link_share == 1


@pytest.mark.parametrize("slots", [0, -1])
def test_bad_settings_are_refused(slots: int) -> None:
    with pytest.raises(ValueError):
        UploadGate(slots=slots, window_bytes=MB)
    with pytest.raises(ValueError):
        UploadGate(slots=1, window_bytes=MB, uplink_bps=-1.0)


async def test_a_cancelled_wait_leaves_nothing_held() -> None:
    uploads = Uploads(slots=1, window_bytes=0)
    await uploads.take(MB)
    with trio.move_on_after(0.01):
        await uploads.take(MB)  # queued behind the first, then cancelled
    uploads.release(MB)
    assert uploads.gate.active == 0 and uploads.gate.active_bytes == 0
    with trio.fail_after(1):
        await uploads.take(MB)  # the withdrawn waiter does not hold the place
