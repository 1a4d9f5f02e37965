"""A discrete-event simulator of a fine-tune on a swarm: wall time, bottlenecks and price.

``engine`` (events, processor-sharing flows, FIFO servers), ``workload`` (the encrypted products
of a training step: the trainer's own plan of the model, handed over as data, and their sizes),
``swarm`` (client, providers, links, failures), ``policy`` (the client's real router and peer
table driven in simulated time), ``run`` (a whole fine-tune) and ``report`` (the printed
breakdown). `cipherswarm estimate` is its command line.
"""

from .run import Estimate, simulate
from .swarm import ClientSpec, GpuAssumption, ProviderSpec, Swarm
from .workload import LayerGroup, LinearLayer, ModelShape, Workload

__all__ = ["ClientSpec", "Estimate", "GpuAssumption", "LayerGroup", "LinearLayer", "ModelShape", "ProviderSpec", "Swarm", "Workload",
           "simulate"]
