"""Parameter servers: global embedding tables, sparse optimizer, pull/push.

PS ranks hold every ESD table split row-wise into contiguous blocks (like
TorchRec's row-wise sharding: block ``ceil(N / P)``, :meth:`~torchrec_esd.layout.KeySpace.locate`),
with the optimizer state.  Workers talk to them in lock-step phases through a
:class:`Transport` (the seam; :class:`GlooP2PTransport` is gloo point-to-point
on the group spanning all ranks) with the typed frames of
:mod:`torchrec_esd.ps.protocol`:

* :mod:`~torchrec_esd.ps.protocol`: commands, frames, payloads, bounds;
* :mod:`~torchrec_esd.ps.transport`: :class:`Transport`, :class:`LinkMeter`;
* :mod:`~torchrec_esd.ps.server`: :class:`ParameterServer` (one PS rank);
* :mod:`~torchrec_esd.ps.client`: :class:`PsClient` (a worker's side);
* :mod:`~torchrec_esd.ps.des_route`: DES-served rows split over the PS.

Every message is self-describing (counts first, then keys, then payloads), so
the PS needs no copy of the workers' cache directory.
"""

from torchrec_esd.optim import SparseOptimizer
from torchrec_esd.ps.client import PsClient
from torchrec_esd.ps.des_route import DesRequest, DesRoute
from torchrec_esd.ps.protocol import (
    Command,
    EsdPeerLostError,
    EsdProtocolError,
    EsdRemoteError,
    ProtocolLimits,
    RowFormat,
    Section,
    SectionSize,
)
from torchrec_esd.ps.server import ParameterServer
from torchrec_esd.ps.transport import GlooP2PTransport, LinkMeter, LinkStats, Traffic, Transport

__all__ = [
    "Command",
    "DesRequest",
    "DesRoute",
    "EsdPeerLostError",
    "EsdProtocolError",
    "EsdRemoteError",
    "GlooP2PTransport",
    "LinkMeter",
    "LinkStats",
    "ParameterServer",
    "ProtocolLimits",
    "PsClient",
    "RowFormat",
    "Section",
    "SectionSize",
    "SparseOptimizer",
    "Traffic",
    "Transport",
]
