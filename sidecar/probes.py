"""Health probes a sidecar runs in the background, once a second.

Peers ejected as unreachable are probed with ``grpc.health.v1`` (a passing
probe brings one back); an app that stopped answering is tried until it
accepts connections again (peers' probes of this sidecar then see SERVING).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.channels import ChannelPool
from sidecar.inbound import InboundDirector
from sidecar.outbound import OutboundDirector

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0


async def probe_ejected_peers(outbound: OutboundDirector, pool: ChannelPool) -> None:
    """Every second, probe each peer ejected as unreachable; bring back those that pass."""
    while True:
        await asyncio.sleep(PROBE_INTERVAL)
        for service, ring in outbound.table.rings.items():
            ejector = outbound.ejector(service)
            for peer_id in ejector.awaiting_probe():
                peer = ring.peers.get(peer_id)
                if peer is not None and await serving(pool, peer.address):
                    log.info("%s/%s passed its health probe: back in rotation", service, peer_id)
                    ejector.probe_passed(peer_id)


async def probe_app(inbound: InboundDirector, pool: ChannelPool, app: str) -> None:
    """While the app is unreachable, try it every second: a restarted app is back in
    rotation as soon as it accepts connections."""
    while True:
        await asyncio.sleep(PROBE_INTERVAL)
        if not inbound.app_up and await pool.ensure_connected(app, PROBE_TIMEOUT):
            inbound.note_app(up=True)


async def serving(pool: ChannelPool, address: str) -> bool:
    """Does the sidecar at ``address`` answer SERVING to a grpc.health.v1 check?"""
    stub = health_pb2_grpc.HealthStub(pool.channel(address))
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
