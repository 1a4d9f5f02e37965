"""The dashboard's HTTP server: a read-only page and the JSON it polls, over trio streams and h11.

Four routes, GET (or HEAD) only: `/` the page, `/app.js` and `/style.css` its script and style
(files of `static/`, read once), `/api/state` the node's snapshot (state.py). Anything else is
404, any other method 405: the server accepts no writes.

Whoever can reach the port may be hostile, so every connection is bounded: one request per
connection (then it is closed), a request head of at most MAX_HEAD_BYTES, REQUEST_TIMEOUT_S to
read it and answer, MAX_CONNECTIONS at once (more are closed unanswered). Bound to loopback, it
answers only requests whose Host is a loopback name: a web page the user visits could otherwise
point a DNS name at 127.0.0.1 and read the snapshot through it (DNS rebinding). The page's
Content-Security-Policy lets it run only its own script and fetch only its own origin.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

import h11
import trio

from ..errors import leaf_errors
from .state import Snapshot

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

_STATIC = {"/": ("index.html", b"text/html; charset=utf-8"), "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
           "/style.css": ("style.css", b"text/css; charset=utf-8")}

Source = Callable[[], Awaitable[Snapshot]]
"""Makes the snapshot a request of /api/state answers with, on the server's trio thread."""


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a started dashboard listens (the real port, when asked for port 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses; False for any other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _static_files() -> dict[str, tuple[bytes, bytes]]:
    folder = resources.files(__package__) / "static"
    return {path: (folder.joinpath(name).read_bytes(), kind) for path, (name, kind) in _STATIC.items()}


class Dashboard:
    """The app: `serve` binds `host:port` (port 0: a free one) and answers until cancelled."""

    def __init__(self, source: Source, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.source = source
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self._files = _static_files()
        self._open = 0  # connections being answered

    async def serve(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then `task_status.started(Bound)` with the real address; serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        address = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(Bound(self.host, int(address[1])))

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._open >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await self._exchange(stream)
                await self._linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("dashboard connection ended: %s", exc)
        finally:
            self._open -= 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _linger(stream: trio.SocketStream) -> None:
        """Half-close, then drop what the client still sends (at most MAX_HEAD_BYTES) until it closes:
        closing with unread bytes would reset the connection, and a reset can discard the answer
        before the client reads it (an oversized head is answered before it is all read)."""
        await stream.send_eof()
        left = MAX_HEAD_BYTES
        while left > 0 and (data := await stream.receive_some(4096)):
            left -= len(data)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        received = 0  # h11 refuses an incomplete head over the limit: reading no further than that bounds any head
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send(stream, conn, exc.error_status_hint, b"text/plain; charset=utf-8",
                                 b"bad request\n", head_only=False)
                return
            if event is h11.NEED_DATA:
                data = await stream.receive_some(min(4096, MAX_HEAD_BYTES + 1 - received))
                if not data:
                    return
                received += len(data)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                await self._answer(stream, conn, event)
            return

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request) -> None:
        head_only = request.method == b"HEAD"
        host = dict(request.headers).get(b"host", b"").decode("ascii", "replace")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if is_loopback(self.host) and name.lower() not in LOOPBACK_NAMES:
            await self._send(stream, conn, 421, b"text/plain; charset=utf-8", b"unknown host\n", head_only=head_only)
            return
        if request.method not in (b"GET", b"HEAD"):
            await self._send(stream, conn, 405, b"text/plain; charset=utf-8", b"read-only: GET or HEAD\n",
                             head_only=False, extra=[(b"allow", b"GET, HEAD")])
            return
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path == "/api/state":
            try:
                body = (await self.source()).to_json()
            except Exception:  # the node is stopping, or its snapshot failed: the page shows it offline
                log.warning("dashboard snapshot failed", exc_info=True)
                await self._send(stream, conn, 503, b"application/json", b'{"error":"unavailable"}', head_only=head_only)
                return
            await self._send(stream, conn, 200, b"application/json", body, head_only=head_only)
        elif path in self._files:
            body, kind = self._files[path]
            await self._send(stream, conn, 200, kind, body, head_only=head_only)
        else:
            await self._send(stream, conn, 404, b"text/plain; charset=utf-8", b"not found\n", head_only=head_only)

    @staticmethod
    async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, kind: bytes, body: bytes, *,
                    head_only: bool, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                   *SECURITY_HEADERS, *(extra or [])]
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()))
        if not head_only:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


@contextlib.contextmanager
def serving_in_thread(snapshot: Callable[[], Snapshot], *, host: str, port: int) -> Iterator[Bound]:
    """Serve a dashboard from a trio loop of its own, in a thread, while the block runs.

    For nodes whose trio loop is not reachable from the caller (SwarmClient runs its own, private):
    `snapshot` is blocking and runs in a worker thread of the dashboard's loop, so a slow snapshot
    never holds the server up. Errors binding the address are raised here, before the block."""
    started: list[Bound] = []
    failure: list[BaseException] = []
    ready = threading.Event()
    stop: list[Callable[[], None]] = []

    async def source() -> Snapshot:
        return await trio.to_thread.run_sync(snapshot)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started.append(await nursery.start(Dashboard(source, host=host, port=port).serve))
            token = trio.lowlevel.current_trio_token()
            stop.append(lambda: token.run_sync_soon(nursery.cancel_scope.cancel))
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # binding failed (raised to the caller), or the server broke
            failure.append(exc)
            if ready.is_set():
                log.error("the dashboard stopped", exc_info=exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="cipherswarm-dashboard", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        error = failure[0]
        leaves = leaf_errors(error) if isinstance(error, BaseExceptionGroup) else [error]
        raise leaves[0] if len(leaves) == 1 else error  # a bind's OSError as itself, not in a group
    try:
        yield started[0]
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            stop[0]()
        thread.join()
