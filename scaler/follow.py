"""An actuator that follows the targets in etcd, whoever writes them.

The scaler's own ``--actuator`` runs inside the leader, so a new leader
starts over with its own instances. Run apart from the scalers, as a
Kubernetes Deployment controller runs apart from the HPA, the replica count
stays put across a change of leader: this loop reads ``targets/<service>``
and hands it to the actuator, which also replaces an instance that died.
"""

from __future__ import annotations

import asyncio
import logging

from registry.errors import EtcdUnavailable
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from scaler.actuators import Actuator
from scaler.leader import read_targets

log = logging.getLogger(__name__)


async def follow_targets(
    client: EtcdClient,
    layout: KeyLayout,
    actuator: Actuator,
    services: tuple[str, ...],
    *,
    interval: float = 0.5,
) -> None:
    """Apply each service's target every ``interval`` seconds until cancelled.

    With etcd unreachable the instances keep running as they are (static
    stability); without a target yet nothing is started.
    """
    while True:
        try:
            targets = await read_targets(client, layout)
        except EtcdUnavailable as exc:
            log.warning("cannot read targets (keeping the instances as they are): %s", exc)
        else:
            for service in services:
                target = targets.get(service)
                if target is not None:
                    await actuator.apply(service, target.replicas)
        await asyncio.sleep(interval)
