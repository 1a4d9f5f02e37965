"""Fine-tune as a client of a swarm, given the providers' bootstrap addresses.

    python examples/finetune_client.py /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... --steps 20

Every base matmul of the bundled tiny LLaMA is encrypted and computed by the providers; LoRA
weights, the optimizer and the data never leave this process. The same as ``cipherswarm train``,
written out with the Python API.
"""

from __future__ import annotations

import argparse
import sys

from cipherswarm.node import SwarmClient
from cipherswarm.trainer.finetune import FinetuneConfig, finetune


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bootstrap", nargs="+", help="provider multiaddrs, as `cipherswarm provider` prints them")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/example-client/adapter")
    args = ap.parse_args()
    config = FinetuneConfig(steps=args.steps)
    with SwarmClient(model_dir=config.model_dir, bootstrap=args.bootstrap, precision=config.precision) as client:
        result = finetune(config, fhe="remote", executor=client)
        stats = client.stats()
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; held-out {result.eval_before:.4f} -> {result.eval_after:.4f}")
    print(f"{stats.chunks} chunks from {len(stats.chunks_by_peer)} providers, {stats.bytes_sent / 1e6:.0f} MB sent, paid {stats.paid}")
    result.trainer.save_and_clear_private_info(args.out)
    print(f"adapters saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
