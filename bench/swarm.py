"""One layer's latency through real provider processes on 127.0.0.1, with 1, 2 and 3 providers.

A random 1-layer LLaMA is saved to a temporary folder; providers (``cipherswarm provider``
processes, one compute thread each) are started one at a time, and after each start a fresh node
client times the same encrypted product of one base layer: encrypt, chunk, send, provider GEMMs,
verify, decrypt. Beside it, in this process: the plain fp32 product and the encrypted product
without a network (encrypt, in-process provider, decrypt, verify).

Every provider and the client share this machine's cores, so adding providers past the core count
cannot shorten the call: the figure shows the swarm's overhead and how the work spreads. The
simulator (``cipherswarm estimate``) predicts the same call on separate machines.

    python bench/swarm.py                       # up_proj of hidden 1024 / intermediate 4096, 3 blocks
    python bench/swarm.py --tokens 2048         # one block: split by output columns
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cipherswarm.fhe_backend import PlainWeights, get_backend
from cipherswarm.fhe_backend.verify import FreivaldsVerifier
from cipherswarm.node.weights import load_model

from common import LoopbackSwarm, random_llama, row, timed

LAYER = "model.layers.0.mlp.up_proj"


@dataclass(frozen=True)
class Scaling:
    """Median seconds of one layer call: plain, encrypted in-process, and through k providers."""

    plain_s: float
    local_s: float
    swarm_s: dict[int, float]
    chunks: dict[int, dict[str, float]]  # chunks per call by provider


def measure(hidden: int, intermediate: int, tokens: int, max_providers: int, reps: int, run_dir: Path) -> Scaling:
    sizes = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=8, num_key_value_heads=8,
                 vocab_size=512)
    model_dir = run_dir / "model"
    random_llama(sizes).save_pretrained(model_dir, safe_serialization=True)
    q = load_model(model_dir).resolve(LAYER).weight.q  # the int8 weights every provider serves
    x = torch.randint(-128, 128, (tokens, q.shape[0]), generator=torch.Generator().manual_seed(1))
    expected = x @ q.long()

    plain_s, _ = timed(lambda: x.float() @ q.float(), reps=reps)
    be, pw = get_backend("rlwe"), PlainWeights(q)
    params = be.params_for(pw, 8)
    sk, verifier = be.keygen(params), FreivaldsVerifier.for_params(pw, params)

    def local() -> torch.Tensor:
        y = be.decrypt(sk, be.matmul(be.encrypt(sk, x), pw))
        verifier.check(x, y)
        return y

    local_s, y = timed(local, reps=reps)
    assert torch.equal(y, expected)
    swarm_s: dict[int, float] = {}
    chunks: dict[int, dict[str, float]] = {}
    calls = reps + 1  # timed() warms up once
    with LoopbackSwarm(model_dir, run_dir / "swarm") as swarm:
        for k in range(1, max_providers + 1):
            swarm.add()
            with swarm.client() as client:
                swarm_s[k], y = timed(lambda: client.matmul(LAYER, x), reps=reps)
                if not torch.equal(y, expected):
                    raise SystemExit(f"the product through {k} provider(s) is not exact")
                names = {p.peer_id: f"p{p.index}" for p in swarm.providers}
                chunks[k] = {names.get(peer, peer[-6:]): n / calls for peer, n in client.stats().chunks_by_peer.items()}
    return Scaling(plain_s, local_s, swarm_s, chunks)


def report(s: Scaling, tokens: int, d_in: int, d_out: int) -> None:
    print(f"\none layer call {tokens} x {d_in} x {d_out} ({LAYER}), 8-bit activations, median of the timed calls")
    print(row("plain fp32 matmul, this process", f"{s.plain_s * 1e3:.0f} ms"))
    print(row("encrypted, in-process provider (no network)", f"{s.local_s * 1e3:.0f} ms",
              f"{s.local_s / s.plain_s:.1f}x plain"))
    base = s.swarm_s[1]
    for k, t in s.swarm_s.items():
        spread = ", ".join(f"{name} {n:g}" for name, n in sorted(s.chunks[k].items()))
        print(row(f"through {k} provider process(es) on loopback", f"{t * 1e3:.0f} ms",
                  f"{base / t:.2f}x the 1-provider speed; chunks per call: {spread}"))


def main() -> None:
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=3 * 2048, help="tokens of the call (2048 per ring block)")
    ap.add_argument("--providers", type=int, default=3, help="largest provider count")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per configuration (median)")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; every process on this machine")
    with tempfile.TemporaryDirectory(prefix="cipherswarm-bench-") as tmp:
        s = measure(args.hidden, args.intermediate, args.tokens, args.providers, args.reps, Path(tmp))
    report(s, args.tokens, args.hidden, args.intermediate)


if __name__ == "__main__":
    main()
