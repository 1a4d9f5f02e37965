"""What one optimizer step learned and cost the client: :class:`StepRecord` and how it is measured.

The CPU a step costs is split by who spent it, each part measured in the thread that spent it, so
that a slow step says whether crypto, the wire, the node's threads or plain torch work made it slow.
A :class:`CpuSnapshot` is taken before and after the step; their difference is the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .executor import ExecutorStatistics
from .quantization import CPU_SECONDS, torch_cpu


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: what was learned and what it cost the client.

    CPU seconds are ``time.process_time`` over the step (all threads of this process), less any
    in-process provider. ``cpu_parts`` names them, each measured in the thread that spent it:

    - quantize, dequantize: the per-token quantization around each product (trainer/quantization.py);
    - local: the rest of the training thread and torch's threads: autograd, non-linear ops, loss,
      optimizer;
    - encrypt, decrypt, verify, serialise, hash: the executor's crypto, wire conversion and SHA-256;
    - with a node client, its trio thread (node/cpu.py): noise, streams (yamux, framing, sockets),
      signatures, ledger, discovery, client_tasks (routing, dispatching), trio_scheduler; and
      handoff, the training thread's side of each call into it.

    ``cpu_unnamed_s`` is what no part claims (``cpu_s`` less their sum): small when every part is named.
    """

    step: int  # optimizer steps done, this one included
    epoch: int
    loss: float  # mean micro-batch loss of the step (before division for accumulation)
    lr: float  # learning rate the step used
    grad_norm: float  # global L2 norm of the trainable gradients before clipping
    tokens: int  # tokens that entered the step (attention_mask ones)
    wall_s: float
    cpu_s: float  # client CPU, in-process provider excluded
    cpu_encrypt_s: float
    cpu_decrypt_s: float
    cpu_verify_s: float
    cpu_wire_s: float  # serialising ciphertexts and parsing results
    cpu_plain_s: float  # the client's own plaintext work: quantize + dequantize + local (see above)
    provider_s: float  # CPU of a provider running in this process (0 when it runs elsewhere)
    remote_calls: int
    bytes_sent: int
    bytes_received: int
    eval: dict[str, float] | None = None
    cpu_parts: dict[str, float] | None = None  # CPU seconds by part (above); None in old checkpoints
    cpu_unnamed_s: float = 0.0


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative wall and CPU figures at one moment, for a step's deltas (StepRecord's docstring)."""

    wall: float  # time.perf_counter
    process: float  # time.process_time
    torch: float  # training thread + torch's native threads
    trainer: dict[str, float]  # quantization.CPU_SECONDS
    executor: ExecutorStatistics
    node: dict[str, float] | None  # a node client's hash and trio-thread parts; None for other executors

    @classmethod
    def take(cls, executor: object) -> "CpuSnapshot":
        """The figures now; taken between micro-batches, when no product is in flight, so the two
        reads of the executor agree."""
        stats = getattr(executor, "statistics", None)
        snap = stats() if stats is not None else None
        trio_cpu = getattr(snap, "trio_cpu", None)
        node = None if trio_cpu is None else {"hash": float(getattr(snap, "hash_s", 0.0)), **trio_cpu}
        return cls(time.perf_counter(), time.process_time(), torch_cpu(), dict(CPU_SECONDS),
                   ExecutorStatistics.of(executor), node)

    def parts_since(self, start: "CpuSnapshot") -> tuple[float, ExecutorStatistics, dict[str, float]]:
        """(process CPU, executor statistics, named parts) from ``start`` to this snapshot."""
        st = self.executor - start.executor
        trainer = {k: v - start.trainer.get(k, 0.0) for k, v in self.trainer.items()}
        parts = {"quantize": trainer["quantize"], "dequantize": trainer["dequantize"],
                 "local": self.torch - start.torch - trainer["quantize"] - trainer["dequantize"] - trainer["executor"],
                 "encrypt": st.encrypt_s, "decrypt": st.decrypt_s, "verify": st.verify_s, "serialise": st.wire_s}
        if self.node is not None:
            before = start.node or {}
            parts.update({k: v - before.get(k, 0.0) for k, v in self.node.items()})
            parts["handoff"] = trainer["executor"]  # the training thread's side of the calls into the node's threads
        # else: a local executor's work runs in the training thread, inside its own statistics
        return self.process - start.process, st, parts


def measure_step(start: CpuSnapshot, executor: object, *, step: int, epoch: int, group: list[tuple[float, int]],
                 lr: float, grad_norm: float) -> StepRecord:
    """The record of the step that began at ``start`` and ends now; ``group`` holds each micro-batch's
    (loss, tokens)."""
    end = CpuSnapshot.take(executor)
    cpu, st, parts = end.parts_since(start)
    return StepRecord(
        step=step, epoch=epoch, loss=sum(l for l, _ in group) / len(group), lr=lr,
        grad_norm=grad_norm, tokens=sum(t for _, t in group), wall_s=end.wall - start.wall, cpu_s=cpu - st.provider_s,
        cpu_encrypt_s=st.encrypt_s, cpu_decrypt_s=st.decrypt_s, cpu_verify_s=st.verify_s, cpu_wire_s=st.wire_s,
        cpu_plain_s=parts["quantize"] + parts["dequantize"] + parts["local"], provider_s=st.provider_s,
        remote_calls=st.calls, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
        cpu_parts={k: round(v, 6) for k, v in parts.items()}, cpu_unnamed_s=cpu - st.provider_s - sum(parts.values()),
    )
