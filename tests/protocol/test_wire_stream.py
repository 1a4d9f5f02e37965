"""The trio reader and writer over in-memory streams, with short reads, closes and stalling peers."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wire_factory import CLIENT, CLIENT_KEY, LIMITS, PAYLOAD, make_advert, request_frame

from cipherswarm.protocol import DeadlineExceeded, FrameTooLarge, Limits, TruncatedFrame, seal
from cipherswarm.protocol.stream import read_frame, write_frame
from cipherswarm.protocol.varint import encode_uvarint


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
    await write_frame(sender, sealed, PAYLOAD)
    await write_frame(sender, advert)
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
        nursery.start_soon(write_frame, sender, sealed, payload)
        frame = await read_frame(receiver, limits=Limits(max_payload_size=len(payload)))
    assert frame.payload == payload


async def test_clean_close_between_frames() -> None:
    sender, receiver = pair()
    sealed, _ = request_frame()
    await write_frame(sender, sealed, PAYLOAD)
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
        await write_frame(LibP2PStyle(left), sealed, PAYLOAD, timeout_s=3)
    assert caught.value.what == "write"


async def test_transport_failures_propagate_unchanged() -> None:
    class Reset:
        async def read(self, n: int) -> bytes:
            raise ConnectionResetError("stream reset")

    with pytest.raises(ConnectionResetError):
        await read_frame(Reset(), limits=LIMITS)

