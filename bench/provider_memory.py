"""A provider's memory under the largest amplifying requests the protocol allows, against the bound it advertises.

    .venv/bin/python bench/provider_memory.py            # TinyLlama-1.1B's MLP shapes (2048 -> 5632), one block
    .venv/bin/python bench/provider_memory.py --quick    # 512 -> 1408: a smoke run

A `cipherswarm provider` process with its default limits serves a one-block random LLaMA. From
another host the bench sends, as signed requests:

(a) one contraction row of up_proj at the most tokens the protocol allows (2^21): about 10 MB of
    payload asking for a reply of 2^21 x 5632 values (before the limits: served, the reply about
    6 B and the product 16 B per value);
(b) the whole contraction at the most tokens the payload limit allows;
(c) the largest request its advert allows (output elements and reply bytes), encrypted and served
    whole in one frame (protocol 1.1), then (d) streamed a block at a time (1.2, what clients now
    negotiate);
(e), (f): as many output elements in 4x the ring blocks (a quarter of the columns), on 1.1 then 1.2.

For each it prints what the header asked for, the answer, and the provider's resident memory
growth (its high-water mark, reset before each request, over its settled RSS) beside the
per-request bound its advert implies: 16 B per output element computed, the reply twice
(serialized, then as bytes), one product's scratch and the payload three times.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_llama  # noqa: E402

from cipherswarm.cli.localswarm import start_provider  # noqa: E402

from cipherswarm.fhe_backend.ciphertext import ciphertext_size, result_size  # noqa: E402
from cipherswarm.fhe_backend.evaluator import SCRATCH_BYTES, output_elements  # noqa: E402
from cipherswarm.node import ProviderAdvert, load_model, open_host  # noqa: E402
from cipherswarm.node.discovery import now_ms, read_advert  # noqa: E402
from cipherswarm.node.engine import BACKEND, ENGINE, decode_params, encode_params  # noqa: E402
from cipherswarm.node.identity import signing_key  # noqa: E402
from cipherswarm.node.streams import close_stream, read_frame, request_reply  # noqa: E402
from cipherswarm.protocol import (  # noqa: E402
    ADVERT_PROTOCOL_ID, GROUP_PROTOCOL_ID, PROTOCOL_IDS, STREAM_PROTOCOL_ID, Limits, MatmulRequest, ProtocolError, Range, WeightSlice, seal, verify_reply,
)
from cipherswarm.protocol.messages import MAX_DIM  # noqa: E402
from cipherswarm.protocol.varint import encode_uvarint  # noqa: E402

START_S = 300.0  # longest wait for the provider to serve
TINYLLAMA_MLP = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=256)
QUICK = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4, vocab_size=256)
UP = "model.layers.0.mlp.up_proj.weight"


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


async def fetch_advert(node, peer: ID) -> ProviderAdvert:
    stream = await node.host.new_stream(peer, [ADVERT_PROTOCOL_ID])
    data = b""
    try:
        while chunk := await stream.read(1 << 16):
            data += chunk
    except Exception:  # noqa: BLE001  # the end of the stream
        pass
    return read_advert(data)


async def send(node, peer: ID, request: MatmulRequest, payload: bytes, advert: ProviderAdvert,
               protocols: tuple[str, ...] = PROTOCOL_IDS) -> tuple[str, int]:
    """The answer's code name ("OK") and the reply's payload bytes; an empty `payload` sends the header only."""
    stream = await node.host.new_stream(peer, list(protocols))
    try:
        sealed = seal(request, signing_key(node.key_pair))
        limits = Limits(max_payload_size=advert.max_reply_size)
        if len(payload) == request.payload_length:
            frame = await request_reply(stream, sealed, payload, limits=limits, read_timeout_s=110, frame_timeout_s=300)
        else:  # the header alone: the provider must answer it before any payload
            await stream.write(encode_uvarint(len(sealed.header)) + sealed.header)
            frame = await read_frame(stream, limits=limits, read_timeout_s=10, frame_timeout_s=10)
        verify_reply(frame, peer=peer.to_bytes(), request=sealed)
        return "OK", len(frame.payload)
    except ProtocolError as exc:
        return exc.code.name, 0
    finally:
        await close_stream(stream, reset=True)


async def run(model_dir: Path, work: Path) -> None:
    weights = load_model(model_dir)
    up = weights.plain(UP)
    d_in, d_out = up.w.shape
    params = ENGINE.params_for(up, 8)
    provider = start_provider(0, model=model_dir, run_dir=work, name="provider", price=0, weight_bits=weights.weight_bits)
    try:
        addr = Multiaddr(await trio.to_thread.run_sync(provider.wait_addr, START_S))
        peer = ID.from_base58(addr.get_peer_id())
        async with open_host(create_new_key_pair()) as node:
            await node.connect(addr)
            advert = await fetch_advert(node, peer)
            per_request = 16 * advert.max_output_elements + 2 * advert.max_reply_size + SCRATCH_BYTES
            print(f"provider pid {provider.proc.pid}: advertises max_reply_size {advert.max_reply_size} B, max_output_elements "
                  f"{advert.max_output_elements}, min_contraction {advert.min_contraction}, max_payload_size "
                  f"{advert.max_payload_size} B; per-request bound beyond the payload: {per_request} B\n")

            def header(rows: int, tokens: int) -> tuple[MatmulRequest, bytes]:
                request = MatmulRequest.for_payload(
                    b"", expires_at_ms=now_ms() + 110_000, model_hash=weights.model_hash, layer=UP,
                    weight_slice=WeightSlice(rows=Range(0, rows), cols=Range(0, d_out)), transpose=False,
                    backend=BACKEND, backend_params=encode_params(params), input_shape=(tokens, rows),
                    output_shape=(tokens, d_out), price_per_gmac=0)
                return dataclasses.replace(request, payload_length=ciphertext_size(params, tokens, rows)), b""

            full_tokens = (advert.max_payload_size - 4096) // (d_in * params.in_bytes)
            fit_tokens = advert.max_output_elements // (params.n * d_out) * params.n
            x = torch.randint(-128, 128, (fit_tokens, d_in))
            encrypted = ENGINE.encrypt(ENGINE.keygen(params), x).to_bytes()

            def served(tokens: int, cols: int) -> MatmulRequest:
                return MatmulRequest.for_payload(
                    encrypted if tokens == fit_tokens else quartered, expires_at_ms=now_ms() + 110_000,
                    model_hash=weights.model_hash, layer=UP, weight_slice=WeightSlice(rows=Range(0, d_in), cols=Range(0, cols)),
                    transpose=False, backend=BACKEND, backend_params=encode_params(params), input_shape=(tokens, d_in),
                    output_shape=(tokens, cols), price_per_gmac=0)

            four = 4 * fit_tokens  # 4x the ring blocks, at a quarter of the columns
            quartered = ENGINE.encrypt(ENGINE.keygen(params), torch.randint(-128, 128, (four, d_in))).to_bytes()
            one, streamed = (GROUP_PROTOCOL_ID,), (STREAM_PROTOCOL_ID,)
            # each request made when it is sent: its lifetime counts from then
            cases = [(f"(a) 1 row x {MAX_DIM} tokens", lambda: header(1, MAX_DIM), PROTOCOL_IDS),
                     (f"(b) {d_in} rows x {full_tokens} tokens", lambda: header(d_in, full_tokens), PROTOCOL_IDS),
                     (f"(c) {d_in} x {fit_tokens} x {d_out}, 1.1", lambda: (served(fit_tokens, d_out), encrypted), one),
                     (f"(d) {d_in} x {fit_tokens} x {d_out}, 1.2", lambda: (served(fit_tokens, d_out), encrypted), streamed),
                     (f"(e) {d_in} x {four} x {d_out // 4}, 1.1", lambda: (served(four, d_out // 4), quartered), one),
                     (f"(f) {d_in} x {four} x {d_out // 4}, 1.2", lambda: (served(four, d_out // 4), quartered), streamed)]
            print(f"  {'request':<32} {'payload B':>12} {'asked reply B':>15} {'asked elements':>15} {'answer':>15} "
                  f"{'reply B':>11} {'RSS growth B':>13} {'bound B':>12} {'growth/bound':>12}")
            for label, make, protocols in cases:
                request, payload = make()
                (m, k), n_out = request.input_shape, request.output_shape[1]
                bound = per_request + 3 * request.payload_length
                await trio.sleep(0.5)
                settled = vm(provider.proc.pid, "VmRSS")
                Path(f"/proc/{provider.proc.pid}/clear_refs").write_text("5")
                answer, got = await send(node, peer, request, payload, advert, protocols)
                growth = vm(provider.proc.pid, "VmHWM") - settled
                print(f"  {label:<32} {request.payload_length:>12} {result_size(params, m, n_out):>15} "
                      f"{output_elements(params, m, n_out):>15} {answer:>15} {got:>11} {growth:>13} {bound:>12} "
                      f"{growth / bound:>12.4f}")
    finally:
        provider.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 512 -> 1408 model: a smoke run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        random_llama(QUICK if args.quick else TINYLLAMA_MLP).save_pretrained(model_dir, safe_serialization=True)
        trio.run(run, model_dir, work)


if __name__ == "__main__":
    main()
