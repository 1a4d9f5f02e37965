"""The node's frame reader and writer (node/streams.py) over in-memory trio streams, with short
reads, closes and stalling peers."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))  # the protocol tests' keys and messages
from wire_factory import CLIENT, CLIENT_KEY, LIMITS, PAYLOAD, make_advert, request_frame  # noqa: E402

from cipherswarm.node.streams import FrameHead, read_frame, read_header, read_payload, send_frame  # noqa: E402
from cipherswarm.protocol import DeadlineExceeded, FrameTooLarge, Limits, TruncatedFrame, decode_frame, seal  # noqa: E402
from cipherswarm.protocol.framing import frame_prefix  # noqa: E402
from cipherswarm.protocol.varint import encode_uvarint  # noqa: E402


class LibP2PStyle:
    """A trio stream behind libp2p's INetStream methods; `max_read` forces short reads."""

    def __init__(self, stream: trio.abc.Stream, max_read: int | None = None) -> None:
        self.stream = stream
        self.max_read = max_read

    async def read(self, n: int) -> bytes:
        return await self.stream.receive_some(n if self.max_read is None else min(n, self.max_read))

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)


class EOFRaising:
    """Ends like libp2p's NetStream: StreamEOF (an EOFError) instead of b""."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        if not self.data:
            raise EOFError
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def pair(max_read: int | None = None) -> tuple[LibP2PStyle, LibP2PStyle]:
    left, right = trio.testing.memory_stream_pair()
    return LibP2PStyle(left), LibP2PStyle(right, max_read)


async def test_frames_cross_with_short_reads() -> None:
    sender, receiver = pair(max_read=3)
    sealed, _ = request_frame()
    advert = seal(make_advert(), CLIENT_KEY)
    await send_frame(sender, sealed, PAYLOAD, timeout_s=5)  # type: ignore[arg-type]  # an INetStream's methods
    await send_frame(sender, advert, timeout_s=5)  # type: ignore[arg-type]
    first = await read_frame(receiver, limits=LIMITS)
    second = await read_frame(receiver, limits=LIMITS)
    assert first.header.message == sealed.message and first.payload == PAYLOAD
    assert first.header.verify(CLIENT) == CLIENT
    assert second.header.message == advert.message and second.payload == b""


async def test_large_payload_is_read_in_chunks() -> None:
    payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB, over READ_CHUNK twice
    sender, receiver = pair()
    sealed, _ = request_frame(payload)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(send_frame, sender, sealed, payload, timeout_s=5))  # type: ignore[arg-type]
        frame = await read_frame(receiver, limits=Limits(max_payload_size=len(payload)))
    assert frame.payload == payload


async def test_clean_close_between_frames() -> None:
    sender, receiver = pair()
    sealed, _ = request_frame()
    await send_frame(sender, sealed, PAYLOAD, timeout_s=5)  # type: ignore[arg-type]
    await sender.stream.send_eof()  # type: ignore[attr-defined]
    await read_frame(receiver, limits=LIMITS)
    with pytest.raises(TruncatedFrame) as caught:
        await read_frame(receiver, limits=LIMITS)
    assert caught.value.is_clean_close


async def test_close_inside_a_frame() -> None:
    sender, receiver = pair()
    _, data = request_frame()
    await sender.write(data[:-5])
    await sender.stream.send_eof()  # type: ignore[attr-defined]
    with pytest.raises(TruncatedFrame) as caught:
        await read_frame(receiver, limits=LIMITS)
    assert (caught.value.expected_bytes, caught.value.received_bytes) == (len(data), len(data) - 5)
    assert not caught.value.is_clean_close


async def test_eof_raised_by_the_stream() -> None:
    _, data = request_frame()
    with pytest.raises(TruncatedFrame):
        await read_frame(EOFRaising(data[:10]), limits=LIMITS)  # type: ignore[arg-type]


async def test_oversized_prefix_refused_without_waiting_for_more() -> None:
    sender, receiver = pair()
    await sender.write(encode_uvarint(2**40))  # and then nothing: the reader must not wait
    with trio.fail_after(1):
        with pytest.raises(FrameTooLarge):
            await read_frame(receiver, limits=LIMITS)


async def test_stalling_peer_hits_the_read_deadline(autojump_clock: trio.testing.MockClock) -> None:
    sender, receiver = pair()
    _, data = request_frame()
    await sender.write(data[:20])
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded) as caught:
        await read_frame(receiver, limits=LIMITS, read_timeout_s=5)
    assert (caught.value.what, caught.value.timeout_s) == ("read", 5)
    assert trio.current_time() - start == pytest.approx(5)


async def test_trickling_peer_hits_the_frame_deadline(autojump_clock: trio.testing.MockClock) -> None:
    sender, receiver = pair()
    _, data = request_frame()

    async def trickle() -> None:
        for byte in data:
            await sender.write(bytes([byte]))
            await trio.sleep(4)  # each read succeeds within its 5 s, the frame never completes in time

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(DeadlineExceeded) as caught:
            await read_frame(receiver, limits=LIMITS, read_timeout_s=5, frame_timeout_s=20)
        nursery.cancel_scope.cancel()
    assert caught.value.what == "frame"


async def test_peer_not_reading_hits_the_write_deadline(autojump_clock: trio.testing.MockClock) -> None:
    left, _ = trio.testing.lockstep_stream_pair()  # a write completes only when the peer reads
    sealed, _ = request_frame()
    with pytest.raises(DeadlineExceeded) as caught:
        await send_frame(LibP2PStyle(left), sealed, PAYLOAD, timeout_s=3)  # type: ignore[arg-type]
    assert caught.value.what == "write"


async def test_transport_failures_propagate_unchanged() -> None:
    class Reset:
        async def read(self, n: int) -> bytes:
            raise ConnectionResetError("stream reset")

    with pytest.raises(ConnectionResetError):
        await read_frame(Reset(), limits=LIMITS)



# --- a provider's two-step read: the header under a short deadline, then the payload at a minimum rate ---


async def test_read_header_reads_no_byte_of_the_payload() -> None:
    sender, receiver = pair(max_read=7)
    sealed, data = request_frame()
    await sender.write(data)
    head = await read_header(receiver, limits=LIMITS, timeout_s=5)
    assert head.header.message == sealed.message and head.header.verify(CLIENT) == CLIENT
    assert (head.head_bytes, head.payload_length) == (len(frame_prefix(sealed, PAYLOAD)), len(PAYLOAD))
    assert await read_payload(receiver, head, min_rate=1, grace_s=5) == PAYLOAD


async def test_read_header_refuses_a_declared_payload_over_the_limit_before_it_comes() -> None:
    sender, receiver = pair()
    sealed, _ = request_frame(bytes(1000))
    await sender.write(frame_prefix(sealed, bytes(1000)))  # the header, and none of its payload
    with trio.fail_after(1), pytest.raises(FrameTooLarge) as caught:
        await read_header(receiver, limits=Limits(max_payload_size=999), timeout_s=5)
    assert caught.value.what == "payload"


async def test_read_header_clean_close_and_truncation() -> None:
    sender, receiver = pair()
    await sender.stream.send_eof()  # type: ignore[attr-defined]
    with pytest.raises(TruncatedFrame) as caught:
        await read_header(receiver, limits=LIMITS, timeout_s=5)
    assert caught.value.is_clean_close
    sender, receiver = pair()
    _, data = request_frame()
    await sender.write(data[:30])
    await sender.stream.send_eof()  # type: ignore[attr-defined]
    with pytest.raises(TruncatedFrame) as caught:
        await read_header(receiver, limits=LIMITS, timeout_s=5)
    assert caught.value.received_bytes == 30 and not caught.value.is_clean_close


async def test_trickled_header_hits_the_header_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """One byte a second: every read is prompt, the header is not: cut after the header deadline,
    whatever the (much longer) frame deadline of a whole-frame read would be."""
    sender, receiver = pair()
    _, data = request_frame()

    async def trickle() -> None:
        for byte in data:
            await sender.write(bytes([byte]))
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded) as caught:
            await read_header(receiver, limits=LIMITS, timeout_s=5)
        nursery.cancel_scope.cancel()
    assert (caught.value.what, caught.value.timeout_s) == ("header", 5)
    assert trio.current_time() - start == pytest.approx(5)


def _head(size: int) -> FrameHead:
    """What read_header gives for a request with a `size`-byte payload."""
    _, data = request_frame(bytes(size))
    return FrameHead(decode_frame(data, limits=Limits(max_payload_size=size)).header, len(data) - size, size)


@pytest.mark.parametrize(("rate", "cut"), [(1000, False), (400, True)])
async def test_payload_below_the_minimum_rate_is_cut(autojump_clock: trio.testing.MockClock, rate: int, cut: bool) -> None:
    """Minimum rate 500 B/s after 2 s of grace, 5000 bytes sent in 100-byte pieces: 1000 B/s
    passes; 400 B/s falls behind (5000 bytes would need 12.5 s, 12 s are allowed) and is cut,
    though each of its reads is prompt."""
    sender, receiver = pair()
    head = _head(5000)

    async def send() -> None:
        for _ in range(50):
            await trio.sleep(100 / rate)
            await sender.write(bytes(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        start = trio.current_time()
        if cut:
            with pytest.raises(DeadlineExceeded) as caught:
                await read_payload(receiver, head, min_rate=500, grace_s=2, read_timeout_s=5, start=start)
            assert caught.value.what == "payload" and caught.value.timeout_s == pytest.approx(12)
            assert trio.current_time() - start == pytest.approx(12)
        else:
            assert await read_payload(receiver, head, min_rate=500, grace_s=2, read_timeout_s=5) == bytes(5000)
        nursery.cancel_scope.cancel()


async def test_payload_rate_counts_from_the_given_start(autojump_clock: trio.testing.MockClock) -> None:
    """The grace runs from `start` (the provider passes the stream's opening), and `not_after`
    (the request's expiry) cuts even a fast enough sender."""
    sender, receiver = pair()
    head = _head(100)
    start = trio.current_time()
    await trio.sleep(4)  # the header took 4 of the 5 s of grace
    with pytest.raises(DeadlineExceeded):
        await read_payload(receiver, head, min_rate=1000, grace_s=5, start=start)
    assert trio.current_time() - start == pytest.approx(5.1)
    sender, receiver = pair()
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded) as caught:
        await read_payload(receiver, head, min_rate=1000, grace_s=5, start=start, not_after=start + 1)
    assert caught.value.timeout_s == pytest.approx(1) and trio.current_time() - start == pytest.approx(1)


async def test_stalled_payload_hits_the_read_deadline(autojump_clock: trio.testing.MockClock) -> None:
    sender, receiver = pair()
    head = _head(10 << 20)
    with pytest.raises(DeadlineExceeded) as caught:
        await read_payload(receiver, head, min_rate=1, grace_s=60, read_timeout_s=3)
    assert (caught.value.what, caught.value.timeout_s) == ("read", 3)


async def test_payload_ending_early_is_a_truncated_frame() -> None:
    sender, receiver = pair()
    head = _head(100)
    await sender.write(bytes(40))
    await sender.stream.send_eof()  # type: ignore[attr-defined]
    with pytest.raises(TruncatedFrame) as caught:
        await read_payload(receiver, head, min_rate=1, grace_s=5)
    assert caught.value.received_bytes == head.head_bytes + 40 and not caught.value.is_clean_close


async def test_large_payload_read_in_chunks_at_rate() -> None:
    payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB, over READ_CHUNK twice
    sender, receiver = pair()
    sealed, _ = request_frame(payload)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(send_frame, sender, sealed, payload, timeout_s=5))  # type: ignore[arg-type]
        head = await read_header(receiver, limits=Limits(max_payload_size=len(payload)), timeout_s=5)
        assert await read_payload(receiver, head, min_rate=1e6, grace_s=5) == payload
