"""Serve encrypted matmuls of a model's base layers to the swarm.

Loads a Hugging Face model directory (safetensors), quantizes each base linear layer to --weight-bits integers,
measures its own encrypted MAC/s, advertises itself (gossipsub and the DHT) and serves requests
until interrupted. Prints its full multiaddr(s), one per line, once it is serving; logs go to
stderr (libp2p's own to --log-file if given).

Which tensors are layers, and how the model is named: see node/README.md, "Weights".
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from cipherswarm.cli.bits import add_weight_bits
from cipherswarm.cli.dashboard import add_dashboard_argument, announce
from cipherswarm.protocol import DEFAULT_MAX_PAYLOAD_SIZE

if TYPE_CHECKING:
    from multiaddr import Multiaddr

    from cipherswarm.node.nat import RelayServiceConfig

CHEATS = ["random", "flip", "stale", "wrong-weights", "overbill"]
"""node.provider.cheat.Cheat's values, written out: --help must not import the engine."""

log = logging.getLogger("cipherswarm.provider")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="Hugging Face model directory (safetensors), or a .gguf file (converted once, node/README.md)")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", help="multiaddr to listen on (default: loopback, free port)")
    p.add_argument("--bootstrap", nargs="*", default=[], metavar="MULTIADDR", help="peers to join the swarm through")
    p.add_argument("--layers", nargs="*", default=[], metavar="PATTERN",
                   help="hold only layers matching these globs (tensor or module names); default: all")
    p.add_argument("--price", type=int, default=None,
                   help="asked price per 10^9 multiply-accumulates: fixed, or with --min-price/--max-price where the "
                        "dynamic price starts (default 0, or --min-price)")
    p.add_argument("--min-price", type=int, default=None,
                   help="with --max-price: a dynamic price that rises while this provider is saturated and falls "
                        "while it is idle, within these bounds (node/provider/pricing.py)")
    p.add_argument("--max-price", type=int, default=None, help="the dynamic price's upper bound (see --min-price)")
    p.add_argument("--price-ramp", type=float, default=None, metavar="S",
                   help="seconds of saturation from --min-price to --max-price, and of idleness back (default 60)")
    p.add_argument("--slots", type=int, default=2, help="products computed at once")
    p.add_argument("--queue", type=int, default=2, help="requests waiting for a slot before BUSY replies")
    p.add_argument("--identity", type=Path, default=None,
                   help="identity key file, created if missing (default: ~/.cipherswarm/identity.key)")
    p.add_argument("--ledger", type=Path, default=None, help="SQLite file for countersigned receipts (default: none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="compute device; cuda (extra gpu: cupy) runs int8 tensor-core GEMMs once a start-up "
                        "self-check matches the CPU, else falls back to cpu")
    add_weight_bits(p, "clients find providers of their own width only, since it is part of the model hash")
    p.add_argument("--advert-interval", type=float, default=10.0, help="seconds between adverts")
    _add_limits(p)
    _add_relay(p)
    p.add_argument("--log-level", default="INFO", help="log level of stderr output")
    p.add_argument("--log-file", type=Path, default=None, help="file for libp2p's own log records")
    add_dashboard_argument(p)
    # Hidden: for tests and the testnet's slow or malicious provider.
    p.add_argument("--cheat", choices=CHEATS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--benchmark-seconds", type=float, default=1.0, help=argparse.SUPPRESS)


def price_options(args: argparse.Namespace) -> dict[str, int | float | None]:
    """The ProviderConfig fields of the price flags: a fixed --price, or a dynamic price within
    --min-price/--max-price starting at --price (at the minimum if not given)."""
    start = args.price if args.price is not None else args.min_price if args.min_price is not None else 0
    options: dict[str, int | float | None] = {"price_per_gmac": start, "min_price_per_gmac": args.min_price,
                                              "max_price_per_gmac": args.max_price}
    if args.price_ramp is not None:
        options["price_ramp_s"] = args.price_ramp
    return options


def _ms(seconds: str) -> int:
    return round(1000 * float(seconds))


#: flags of the two groups below whose value, when given, sets the ProviderConfig field named by
#: their dest; left out, the field keeps its default (node/provider/service.py, node/README.md)
CONFIG_FLAGS = ("max_reply_size", "max_output_elements", "min_contraction", "max_ttl_ms", "header_timeout_s",
                "min_upload_rate", "max_opening", "max_opening_per_peer", "max_opening_per_address", "max_per_peer",
                "max_per_address", "max_ack_waiters", "max_unacked", "max_unacked_gmacs", "replay_capacity",
                "replay_per_key", "replay_per_address", "strikes", "struck_streams_per_s", "struck_streams_shared_per_s")


def _add_limits(p: argparse.ArgumentParser) -> None:
    """What one request may ask, and what unauthenticated or slow peers may hold: each flag bounds
    memory or time that a hostile peer could otherwise make the provider spend."""
    work = p.add_argument_group(
        "per-request limits", "advertised to clients, checked on the signed header before the payload is read "
                              "or anything allocated (unset: the defaults of node/README.md)")
    work.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD_SIZE, metavar="BYTES",
                      help=f"largest request payload; (slots + queue) such requests may be held at once "
                           f"(default {DEFAULT_MAX_PAYLOAD_SIZE}: one 4096-token block of an 8B model's widest layer)")
    work.add_argument("--max-reply-size", type=int, dest="max_reply_size", metavar="BYTES",
                      help="largest reply payload: a request asking for more is refused (TOO_LARGE)")
    work.add_argument("--max-output-elements", type=int, dest="max_output_elements", metavar="N",
                      help="largest result computed, in elements (ring blocks x block tokens x columns; 16 bytes "
                           "each while computed): bounds each compute slot's memory")
    work.add_argument("--min-contraction", type=int, dest="min_contraction", metavar="FEATURES",
                      help="fewest input features a request may contract over (unless the layer has fewer): "
                           "thinner slices cost the sender little and this provider a full-width product")
    work.add_argument("--max-ttl", type=_ms, dest="max_ttl_ms", metavar="SECONDS",
                      help="longest request lifetime accepted; also how long each nonce is remembered")
    peers = p.add_argument_group(
        "admission", "how many streams and requests peers may hold, and how fast they must send (unset: the "
                     "defaults of node/README.md; loopback peers are exempt from per-address caps)")
    peers.add_argument("--header-timeout", type=float, dest="header_timeout_s", metavar="SECONDS",
                       help="time from a stream's opening to its request's last header byte; also how long a "
                            "refused stream is drained")
    peers.add_argument("--min-upload-rate", type=float, dest="min_upload_rate", metavar="BYTES_PER_S",
                       help="slowest average rate a request's payload may arrive at before TIMEOUT")
    peers.add_argument("--max-opening", type=int, dest="max_opening", metavar="N",
                       help="streams reading their header at once (unauthenticated); one more evicts the oldest")
    peers.add_argument("--max-opening-per-peer", type=int, dest="max_opening_per_peer", metavar="N",
                       help="... of them from one peer id; more get BUSY")
    peers.add_argument("--max-opening-per-address", type=int, dest="max_opening_per_address", metavar="N",
                       help="... of them from one address (IPv6: a /64); more get BUSY")
    peers.add_argument("--max-per-peer", type=int, dest="max_per_peer", metavar="N",
                       help="admitted requests (read, queued or computed) of one peer id (default: --slots)")
    peers.add_argument("--max-per-address", type=int, dest="max_per_address", metavar="N",
                       help="admitted requests from one address (default: every place but one)")
    peers.add_argument("--max-ack-waiters", type=int, dest="max_ack_waiters", metavar="N",
                       help="replies waiting for their countersigned receipt at once; one more drops the oldest")
    peers.add_argument("--max-unacked", type=int, dest="max_unacked", metavar="N",
                       help="requests of one peer id admitted and not yet acknowledged by a countersigned receipt "
                            "(held until the receipt or 30 s after the reply; advertised); more get BUSY")
    peers.add_argument("--max-unacked-gmacs", type=int, dest="max_unacked_gmacs", metavar="GMACS",
                       help="... their multiply-accumulates, in 10^9 (advertised); more get BUSY")
    peers.add_argument("--replay-capacity", type=int, dest="replay_capacity", metavar="N",
                       help="nonces remembered at once (about 300 bytes each); when full, new requests get BUSY")
    peers.add_argument("--replay-per-key", type=int, dest="replay_per_key", metavar="N",
                       help="... of them from one signing key")
    peers.add_argument("--replay-per-address", type=int, dest="replay_per_address", metavar="N",
                       help="... of them from one address")
    peers.add_argument("--strikes", type=int, dest="strikes", metavar="N",
                       help="refusals of one peer id in a row, none served since, after which its new streams are "
                            "rate-limited and the others reset before protocol negotiation (default 3)")
    peers.add_argument("--struck-streams-per-s", type=float, dest="struck_streams_per_s", metavar="RATE",
                       help="streams a second one such peer may still open (default 1)")
    peers.add_argument("--struck-streams-shared-per-s", type=float, dest="struck_streams_shared_per_s", metavar="RATE",
                       help="... all such peers together (default 16)")


def _add_relay(p: argparse.ArgumentParser) -> None:
    """Circuit relay v2 (node/nat/README.md): serving as a relay, and being reached through one."""
    nat = p.add_argument_group("NAT", "a provider behind a NAT router is reached through a relay, without port forwarding")
    nat.add_argument("--relay", action="append", metavar="auto|off|MULTIADDR",
                     help="a relay's full multiaddr (/ip4/.../tcp/.../p2p/RELAY): hold a reservation there, renewed and "
                          "made again when lost, and advertise the relayed address instead of the listen address; "
                          "repeat it to name relays to fail over to, in order. auto (default): only if the bootstrap "
                          "peers cannot dial back (AutoNAT), on the first of them that relays or of the relays the "
                          "DHT names, the others to fail over to; off: never")
    nat.add_argument("--relay-service", action="store_true", help="relay for other nodes (circuit relay v2 hop), and say so in the DHT so that "
                          "nodes behind NAT find this one")
    nat.add_argument("--relay-slots", type=int, default=None, metavar="N",
                     help="reservations held at once (default 128; 0 refuses every one)")
    nat.add_argument("--relay-reservation-ttl", type=int, default=None, metavar="SECONDS",
                     help="a reservation's lifetime (default 3600)")
    nat.add_argument("--relay-circuits", type=int, default=None, metavar="N",
                     help="relayed connections open at once to one reserving peer (default 16)")
    nat.add_argument("--relay-circuit-duration", type=int, default=None, metavar="SECONDS",
                     help="one relayed connection's longest life (default 3600)")
    nat.add_argument("--relay-circuit-bytes", type=int, default=None, metavar="BYTES",
                     help="bytes one relayed connection carries before it is reset (default 2^30)")


#: --relay-* flags and the RelayServiceConfig fields they set
RELAY_FLAGS = {"relay_slots": "slots", "relay_reservation_ttl": "reservation_ttl_s", "relay_circuits": "circuits_per_peer",
               "relay_circuit_duration": "circuit_duration_s", "relay_circuit_bytes": "circuit_bytes"}


def relay_options(args: argparse.Namespace) -> tuple[RelayServiceConfig | None, list[Multiaddr] | Literal["auto"] | None]:
    """open_host's `relay_service` and `relay` from the NAT flags; ValueError for a bad address or a
    limit out of range."""
    from multiaddr import Multiaddr

    from cipherswarm.node.nat import RelayServiceConfig

    service = None
    if args.relay_service:
        service = RelayServiceConfig(**{field: getattr(args, flag) for flag, field in RELAY_FLAGS.items()
                                        if getattr(args, flag) is not None})
    elif any(getattr(args, flag) is not None for flag in RELAY_FLAGS):
        raise ValueError("the --relay-* limits need --relay-service")
    given = args.relay or ["auto"]
    if len(given) > 1 and {"auto", "off"} & set(given):
        raise ValueError("--relay auto and --relay off stand alone; repeat --relay only with relays' addresses")
    if given == ["auto"]:
        return service, "auto"
    if given == ["off"]:
        return service, None
    for addr in given:
        if "/p2p/" not in addr or "p2p-circuit" in addr:
            raise ValueError(f"--relay needs a relay's full multiaddr ending in /p2p/<peer id>, got {addr}")
    return service, [Multiaddr(addr) for addr in given]


async def _stop_on_sigterm(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("SIGTERM: stopping")
            cancel_scope.cancel()
            return


async def serve(args: argparse.Namespace) -> None:
    from cipherswarm.node import default_identity_path
    from cipherswarm.node.identity import hold_identity

    identity = args.identity or default_identity_path()
    with hold_identity(identity):  # before anything slow: a second provider on one identity is refused at once
        await _serve(args, identity)


async def _serve(args: argparse.Namespace, identity: Path) -> None:
    from multiaddr import Multiaddr

    from cipherswarm.node import Cheat, Ledger, Provider, ProviderConfig, load_identity, load_model
    from cipherswarm.node.gguf import model_dir
    from cipherswarm.node.host import open_host

    key_pair, created = load_identity(identity)
    if created:
        log.info("created identity %s", identity)
    weights = load_model(model_dir(args.model), layers=args.layers, weight_bits=args.weight_bits)
    log.info("model %s: holding %d of %d layers", weights.model_hash.hex()[:16], len(weights.held), len(weights.layers))
    try:
        config = ProviderConfig(
            **price_options(args),
            slots=args.slots,
            queue=args.queue,
            max_payload_size=args.max_payload,
            device=args.device,
            advert_interval_s=args.advert_interval,
            benchmark_s=args.benchmark_seconds,
            delay_s=args.delay,
            cheat=None if args.cheat is None else Cheat(args.cheat),
            **{name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None},
        )
        relay_service, relay = relay_options(args)
    except ValueError as exc:  # a flag out of range: say which, not a traceback
        raise SystemExit(f"cipherswarm provider: error: {exc}") from None
    ledger = None if args.ledger is None else Ledger(args.ledger)
    provider = Provider(weights=weights, key_pair=key_pair, config=config, ledger=ledger)
    bootstrap = [Multiaddr(a) for a in args.bootstrap]
    try:
        async with open_host(key_pair, listen=[Multiaddr(args.listen)], bootstrap=bootstrap,
                             relay_service=relay_service, relay=relay) as node:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
                await nursery.start(provider.serve, node)
                for addr in node.addrs():
                    print(addr, flush=True)
                if args.dashboard is not None:
                    from cipherswarm.node.dashboard import Dashboard, provider_source

                    host, port = args.dashboard
                    announce(await nursery.start(Dashboard(provider_source(provider, node), host=host, port=port).serve))
    finally:
        if ledger is not None:
            ledger.close()


def port_in_use(listen: str) -> int | None:
    """The TCP port of ``listen`` if another process already listens on it, else None.

    libp2p binds with SO_REUSEPORT, so a second provider on a busy port would start silently and
    share its connections with the first; a plain bind (without SO_REUSEPORT) tells the two apart.
    """
    parts = listen.strip("/").split("/")
    if "tcp" not in parts or parts[0] not in ("ip4", "ip6"):
        return None
    port = int(parts[parts.index("tcp") + 1])
    if port == 0:
        return None
    family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by a crashed provider is free to reuse; a listener
        # on it still makes the bind fail
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((parts[1], port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return port
            raise
    return None


def run(args: argparse.Namespace) -> int:
    from cipherswarm.node.logs import configure_logging

    configure_logging(args.log_level, args.log_file)
    busy = port_in_use(args.listen)
    if busy is not None:
        print(f"cipherswarm provider: error: port {busy} is in use: stop the process on it or pick another "
              f"--listen port (tcp/0 picks a free one)", file=sys.stderr)
        return 1
    trio.run(serve, args)
    return 0
