"""The upload gate: small requests together, big ones one at a time, first come first served."""

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


@pytest.mark.parametrize("slots", [0, -1])
def test_bad_settings_are_refused(slots: int) -> None:
    with pytest.raises(ValueError):
        UploadGate(slots=slots, window_bytes=MB)


async def test_a_cancelled_wait_leaves_nothing_held() -> None:
    uploads = Uploads(slots=1, window_bytes=0)
    await uploads.take(MB)
    with trio.move_on_after(0.01):
        await uploads.take(MB)  # queued behind the first, then cancelled
    uploads.release(MB)
    assert uploads.gate.active == 0 and uploads.gate.active_bytes == 0
    with trio.fail_after(1):
        await uploads.take(MB)  # the withdrawn waiter does not hold the place
