"""An honest client's layer call against one provider, unloaded and while hostile peers hit it.

The target: the call completes within 2x its unloaded time while 200 trickling streams and 2,000
junk requests from 50 identities hit the same provider. A random 1-layer LLaMA is saved to a
temporary folder and served by one `cipherswarm provider` process (default limits) on 127.0.0.1.
A node client in this process times one encrypted layer call (encrypt, send, compute, verify,
decrypt, countersign) unloaded; then a load process (this script with `--load`) opens 50
identities, each its own libp2p host connected to the provider, and keeps up:

- trickling streams (`--tricklers`, shared over the identities), half of them sending a valid
  signed header 1 byte every `--trickle-interval` seconds, half a whole signed header then its
  payload 1 KiB per interval; each is reopened as soon as the provider ends it;
- junk requests (`--junk` in all, paced over `--junk-seconds`), signed by their identity and
  refused at the header: a model not held, shapes that do not fit the layer, replays of a nonce
  already used, lifetimes already over;

and the client times the same call again, for as long as the junk is sent. Printed side by side:
unloaded and loaded call times and their ratio, and how the provider ended each trickling stream
and answered each junk request ("not opened": reset before negotiation by the provider's gate,
node/provider/gate.py, once its identity was refused three times in a row).

Everything shares this machine's cores (the load process signs, handshakes and trickles on them
too), so the ratio also carries the load generator's own CPU use; `--load-nice 19` runs the load
at the lowest CPU priority, closer to attackers that spend their own machines' CPU (the outcome
counts show whether it still delivered its load).

    python bench/provider_load.py                    # the full numbers
    python bench/provider_load.py --identities 10 --tricklers 40 --junk 400   # a smoke run
    python bench/provider_load.py --load-nice 19     # the load at the lowest CPU priority
    python bench/provider_load.py --no-gate          # the provider never strikes a peer (gate.py), as before
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cipherswarm.fhe_backend.ciphertext import ciphertext_size
from cipherswarm.node import ModelWeights, NodeHost, load_model, open_host
from cipherswarm.node.discovery import now_ms
from cipherswarm.node.engine import BACKEND, ENGINE, decode_params, encode_params
from cipherswarm.node.identity import signing_key
from cipherswarm.node.streams import close_stream, read_frame, request_reply
from cipherswarm.protocol import PROTOCOL_IDS, Limits, MatmulReply, MatmulRequest, ProtocolError, Range, WeightSlice, seal
from cipherswarm.protocol.framing import frame_prefix

LAYER = "model.layers.0.mlp.up_proj"
REPLY_LIMITS = Limits(max_payload_size=1 << 24)
TRICKLE_BYTES = 1024  # a payload trickler's bytes per interval


@dataclasses.dataclass
class Load:
    """What the hostile peers send, and how the provider answered: outcome name -> count, per kind
    (`header` and `payload` tricklers, `junk`)."""

    identities: int = 50
    tricklers: int = 200
    junk: int = 2000
    junk_seconds: float = 15.0
    trickle_interval_s: float = 2.0
    outcomes: dict[str, Counter[str]] = dataclasses.field(default_factory=lambda: {
        "header": Counter(), "payload": Counter(), "junk": Counter()})


class Requests:
    """Signed requests for LAYER of the provider's model, valid or broken in one way each."""

    def __init__(self, weights: ModelWeights, tokens: int = 16) -> None:
        layer = weights.resolve(LAYER)
        assert layer.weight is not None
        d_in, d_out = layer.weight.q.shape
        params = ENGINE.params_for(layer.weight.q, 8)
        self._fields: dict[str, object] = dict(
            model_hash=weights.model_hash, layer=layer.name, weight_slice=WeightSlice(rows=Range(0, d_in), cols=Range(0, d_out)),
            transpose=False, backend=BACKEND, backend_params=encode_params(params), input_shape=(tokens, d_in),
            output_shape=(tokens, d_out), price_per_gmac=1_000_000,
        )
        self.payload = os.urandom(ciphertext_size(decode_params(encode_params(params)), tokens, d_in))

    def valid(self, **changes: object) -> MatmulRequest:
        fields = dict(self._fields, expires_at_ms=now_ms() + 30_000)
        fields.update(changes)
        return MatmulRequest.for_payload(self.payload, **fields)  # type: ignore[arg-type]

    def junk(self, i: int) -> MatmulRequest:
        """A request refused at its header: UNKNOWN_MODEL, SHAPE_MISMATCH or EXPIRED by turns (the
        replays are sent by `replays`)."""
        kind = i % 3
        if kind == 0:
            return self.valid(model_hash=bytes(32))
        if kind == 1:
            (tokens, d_in), (_, d_out) = self._fields["input_shape"], self._fields["output_shape"]  # type: ignore[misc]
            return self.valid(input_shape=(tokens, d_in + 1), output_shape=(tokens, d_out))
        return self.valid(expires_at_ms=now_ms() - 1_000)


async def _open(node: NodeHost, peer: ID) -> INetStream | str:
    """A new stream to `peer`, or why none opened (the provider's host refused or timed out the
    negotiation: an outcome of the load, after a pause so that a refused loop does not spin)."""
    try:
        return await node.host.new_stream(peer, list(PROTOCOL_IDS))
    except Exception as exc:  # noqa: BLE001  # libp2p's StreamFailure and what it wraps
        cause = exc.__cause__ or exc
        await trio.sleep(0.5)
        return f"not opened ({type(cause).__name__})"


async def _answer(node: NodeHost, peer: ID, request: MatmulRequest, payload: bytes) -> str:
    """Send one whole request; the provider's error code name, "ok", or how the stream ended."""
    stream = await _open(node, peer)
    if isinstance(stream, str):
        return stream
    try:
        frame = await request_reply(stream, seal(request, signing_key(node.key_pair)), payload, limits=REPLY_LIMITS,
                                    read_timeout_s=30, frame_timeout_s=60)
    except (ProtocolError, trio.TooSlowError) as exc:
        return f"no reply ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001  # libp2p's StreamReset, StreamEOF...
        return f"ended ({type(exc).__name__})"
    finally:
        await close_stream(stream)
    reply = frame.header.message
    return "ok" if not isinstance(reply, MatmulReply) or reply.error is None else reply.error.code.name


async def _trickle(node: NodeHost, peer: ID, first: bytes, then: bytes, interval_s: float) -> str:
    """Open a stream, write `first` whole, then `then` TRICKLE_BYTES (or, with no `first`, 1 byte)
    per interval; how the provider ended it: its error code name, or how the stream ended."""
    stream = await _open(node, peer)
    if isinstance(stream, str):
        return stream
    step = TRICKLE_BYTES if first else 1

    async def write() -> None:
        try:
            if first:
                await stream.write(first)
            for start in range(0, len(then), step):
                await stream.write(then[start:start + step])
                await trio.sleep(interval_s)
        except Exception:  # noqa: BLE001  # the provider reset the stream: the reader says how
            pass

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            try:
                frame = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=600, frame_timeout_s=600)
            except Exception as exc:  # noqa: BLE001
                return f"ended ({type(exc).__name__})"
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await close_stream(stream, reset=True)
    reply = frame.header.message
    return "ok" if not isinstance(reply, MatmulReply) or reply.error is None else reply.error.code.name


async def run_load(nodes: list[NodeHost], peer: ID, requests: Requests, load: Load, *,
                   ready: Callable[[], Awaitable[None]]) -> None:
    """Keep `load.tricklers` trickling streams open over `nodes` and send `load.junk` junk requests
    paced over `load.junk_seconds`; `ready` is awaited once all of it is under way, and the load
    stops when it returns (the tricklers' streams are reset)."""

    async def trickler(node: NodeHost, kind: str) -> None:
        while True:
            request = requests.valid()
            sealed = seal(request, signing_key(node.key_pair))
            whole = frame_prefix(sealed, requests.payload)
            first, then = (whole, requests.payload) if kind == "payload" else (b"", whole)
            load.outcomes[kind][await _trickle(node, peer, first, then, load.trickle_interval_s)] += 1

    async def junk(node: NodeHost, share: int) -> None:
        """This identity's share of the junk, evenly paced: first a request whose header passes (its
        payload is not the one signed: BAD_SIGNATURE once read), then replays of its nonce and
        requests.junk by turns."""
        counts = load.outcomes["junk"]
        pace = load.junk_seconds / max(share, 1)
        used = requests.valid()
        counts[await _answer(node, peer, used, bytes(len(requests.payload)))] += 1

        async def one(request: MatmulRequest) -> None:
            counts[await _answer(node, peer, request, requests.payload)] += 1

        async with trio.open_nursery() as sending:  # at its pace, whatever the answers' latency
            for i in range(share - 1):
                await trio.sleep(pace)
                sending.start_soon(one, used if i % 4 == 0 else requests.junk(i))

    async with trio.open_nursery() as nursery:
        owners = itertools.cycle(nodes)
        for i in range(load.tricklers):
            nursery.start_soon(trickler, next(owners), "header" if i % 2 == 0 else "payload")
        shares = [load.junk // len(nodes) + (i < load.junk % len(nodes)) for i in range(len(nodes))]
        async with trio.open_nursery() as junk_nursery:
            for node, share in zip(nodes, shares):
                junk_nursery.start_soon(junk, node, share)
            await trio.sleep(2 * load.trickle_interval_s)  # every trickler has written
            await ready()
            junk_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def hostile_hosts(stack: AsyncExitStack, count: int, provider: Multiaddr) -> list[NodeHost]:
    """`count` hosts of their own identities, each connected to `provider`."""
    nodes = []
    for _ in range(count):
        node = await stack.enter_async_context(open_host(create_new_key_pair()))
        await node.connect(provider)
        nodes.append(node)
    return nodes


# -- the load process ----------------------------------------------------------------------------


async def _load_process(args: argparse.Namespace) -> None:
    """--load: run the load until stdin closes, printing "ready" once it is under way and the
    outcomes as JSON at the end."""
    provider = Multiaddr(args.load)
    load = Load(identities=args.identities, tricklers=args.tricklers, junk=args.junk, junk_seconds=args.junk_seconds,
                trickle_interval_s=args.trickle_interval)
    requests = Requests(load_model(Path(args.model)))

    async def until_stdin_closes() -> None:
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    async with AsyncExitStack() as stack:
        nodes = await hostile_hosts(stack, load.identities, provider)
        peer = ID.from_base58(provider.value_for_protocol("p2p"))
        await run_load(nodes, peer, requests, load, ready=until_stdin_closes)
        # before the hosts stop: tearing 50 down at once may raise, and the figures are in
        print(json.dumps({kind: dict(counts) for kind, counts in load.outcomes.items()}), flush=True)


# -- the benchmark -------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def main() -> None:
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=50)
    ap.add_argument("--tricklers", type=int, default=200)
    ap.add_argument("--junk", type=int, default=2000)
    ap.add_argument("--junk-seconds", type=float, default=15.0, help="the junk requests are spread over this long")
    ap.add_argument("--trickle-interval", type=float, default=2.0, help="seconds between a trickler's writes")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the honest call (2048 per ring block)")
    ap.add_argument("--reps", type=int, default=3, help="timed honest calls unloaded (median); loaded, at least as many, for as long as the junk is sent")
    ap.add_argument("--load-nice", type=int, default=0, metavar="N",
                    help="run the load process at this niceness (0-19). Hostile peers on the internet spend their "
                         "own machines' CPU; at 19 the load's signing and handshakes here barely take CPU from the "
                         "provider and the honest client, so the ratio is closer to the provider's own share")
    ap.add_argument("--no-gate", action="store_true",
                    help="the provider never strikes a peer (node/provider/gate.py): the load as it was met before")
    ap.add_argument("--load", metavar="MULTIADDR", help=argparse.SUPPRESS)  # the load process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        try:
            trio.run(_load_process, args)
        except BaseExceptionGroup as group:  # 50 hosts nest their groups past what a traceback shows
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        return

    import torch

    from common import LoopbackSwarm, random_llama, row, timed

    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; provider, load and client on this machine")
    with tempfile.TemporaryDirectory(prefix="cipherswarm-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        random_llama(dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=512)).save_pretrained(model_dir, safe_serialization=True)
        q = load_model(model_dir).resolve(LAYER).weight.q  # type: ignore[union-attr]
        x = torch.randint(-128, 128, (args.tokens, q.shape[0]), generator=torch.Generator().manual_seed(1))
        expected = x @ q.long()
        with LoopbackSwarm(model_dir, Path(tmp) / "swarm") as swarm:
            started = swarm.add(*(["--strikes", str(1 << 30)] if args.no_gate else []))
            addr, pid = started.addr, started.proc.pid
            with swarm.client() as client:
                cpu, wall = _cpu_s(pid), time.perf_counter()
                unloaded_s, y = timed(lambda: client.matmul(LAYER, x), reps=args.reps)
                provider_unloaded = (_cpu_s(pid) - cpu) / (time.perf_counter() - wall)
                assert torch.equal(y, expected)
                command = ["nice", "-n", str(args.load_nice), sys.executable, __file__, "--load", str(addr),
                           "--model", str(model_dir), "--identities", str(args.identities), "--tricklers", str(args.tricklers), "--junk",
                           str(args.junk), "--junk-seconds", str(args.junk_seconds), "--trickle-interval",
                           str(args.trickle_interval)]
                with open(Path(tmp) / "load.log", "wb") as log:
                    loader = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"})
                assert loader.stdin is not None and loader.stdout is not None
                try:
                    if loader.stdout.readline().strip() != "ready":
                        raise SystemExit("the load process did not start:\n" + (Path(tmp) / "load.log").read_text()[-12000:])
                    cpu, loader_cpu, wall = _cpu_s(pid), _cpu_s(loader.pid), time.perf_counter()
                    loaded_times = []  # for as long as the junk is sent, however fast the calls: all of it meets them
                    while len(loaded_times) < args.reps or time.perf_counter() - wall < args.junk_seconds:
                        call_s, y = timed(lambda: client.matmul(LAYER, x), reps=1, warmup=0)
                        loaded_times.append(call_s)
                        assert torch.equal(y, expected)
                    loaded_s = statistics.median(loaded_times)
                    wall = time.perf_counter() - wall
                    provider_loaded, loader_loaded = (_cpu_s(pid) - cpu) / wall, (_cpu_s(loader.pid) - loader_cpu) / wall
                finally:
                    loader.stdin.close()
                outcomes = json.loads(loader.stdout.readline() or "{}")
                loader.wait(60)
                stats = client.stats()
    ratio = loaded_s / unloaded_s
    print(f"\none layer call {args.tokens} x {args.hidden} x {args.intermediate} ({LAYER}), median of {args.reps} "
          f"unloaded and of {len(loaded_times)} loaded (calls for the junk's {args.junk_seconds:g} s), "
          f"while {args.tricklers} trickling streams and {args.junk} junk requests from {args.identities} identities "
          f"hit the provider (the load at niceness {args.load_nice}; {'no gate' if args.no_gate else 'the gate on'})")
    print(row("honest call, unloaded", f"{unloaded_s * 1e3:.0f} ms"))
    print(row("honest call, loaded", f"{loaded_s * 1e3:.0f} ms", f"{ratio:.2f}x unloaded (goal: <= 2x)", ratio <= 2))
    print(row("provider process CPU, unloaded / loaded (cores busy)", f"{provider_unloaded:.2f} / {provider_loaded:.2f}"))
    print(row("load process CPU while loaded (cores busy, of this machine's)", f"{loader_loaded:.2f} / {os.cpu_count()}"))
    print(f"  honest client: {stats.calls} calls, {stats.chunks} chunks, {stats.busy} BUSY, {stats.retries} retries, "
          f"{stats.timeouts} timeouts")
    for kind, label in (("header", "header tricklers (1 byte per interval)"),
                        ("payload", "payload tricklers (signed header, then 1 KiB per interval)"),
                        ("junk", "junk requests")):
        counts = outcomes.get(kind, {})
        print(f"  {label}: {sum(counts.values())} ended: {_outcomes(counts)}")


if __name__ == "__main__":
    main()
