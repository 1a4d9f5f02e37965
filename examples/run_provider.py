"""Run a provider: serve encrypted products of a model's base layers to the swarm.

    python examples/run_provider.py --model trainer/assets/tiny-shakespeare-llama --listen /ip4/0.0.0.0/tcp/4001

Picks ``--device cuda`` when a CUDA GPU is visible (the provider then computes with int8 limbs on the
tensor cores if its start-up self-check matches the CPU bit for bit, and on the CPU otherwise),
otherwise ``cpu``. What to expect on the CPU: a few float64 GEMMs per product (bench/RESULTS.md:
about 1/9 to 1/14 of a plain fp32 matmul's throughput on the same cores); on a GPU, 12 int8 GEMMs
per product (6 with the shared-mask profile), not measured yet. It prints its full multiaddr once serving: give that to clients as their
``--bootstrap``. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from cipherswarm.cli import main as cipherswarm


def has_cuda() -> bool:
    """True when an NVIDIA driver is visible (nvidia-smi on PATH), whatever torch build is installed."""
    return shutil.which("nvidia-smi") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="trainer/assets/tiny-shakespeare-llama")
    ap.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", help="use /ip4/0.0.0.0/tcp/4001 to serve a LAN")
    ap.add_argument("--price", default="10", help="asked price per 10^9 multiply-accumulates")
    args, rest = ap.parse_known_args()
    device = "cuda" if has_cuda() else "cpu"
    print(f"device: {device}", file=sys.stderr)
    return cipherswarm(["provider", "--model", args.model, "--listen", args.listen, "--price", args.price,
                        "--device", device, *rest])


if __name__ == "__main__":
    sys.exit(main())
