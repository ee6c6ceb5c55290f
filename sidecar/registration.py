"""This instance in etcd: its record put under the lease and kept, and "registered"
said only once the sidecar's own watch shows the record (so the app's first
call through it routes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from registry.keys import KeyLayout
from registry.lease import LeaseKeeper
from registry.records import DRAINING, InstanceRecord
from registry.topology import Topology
from sidecar.discovery import AppSurface, discover, wait_reachable

log = logging.getLogger(__name__)

ROUTED_PATIENCE = 5.0  # seconds before saying that our own watch has not shown us


class Registration:
    def __init__(
        self,
        *,
        layout: KeyLayout,
        keeper: LeaseKeeper,
        service: str,
        instance_id: str,
        address: str,
        app: str,
        zone: str,
        weight: int,
        version: str,
    ) -> None:
        self._layout = layout
        self._keeper = keeper
        self._service = service
        self._instance_id = instance_id
        self._address = address
        self._app = app
        self._zone = zone
        self._weight = weight
        self._version = version
        self.record: InstanceRecord | None = None
        self.surface = AppSurface()
        self._routed = asyncio.Event()

    @property
    def key(self) -> str:
        return self._layout.instance(self._service, self._instance_id)

    def saw(self, topology: Topology) -> None:
        """A topology the watch delivered: does it hold our record as we put it
        (not one an earlier run left under the same id)?"""
        if self.record is None or self._routed.is_set():
            return
        entry = topology.services.get(self._service, {}).get(self._instance_id)
        if entry is not None and entry.record == self.record:
            self._routed.set()

    async def run(self, *, registered: Callable[[], None]) -> None:
        """Put the record once the app answers, keep the lease; call ``registered``
        once our own watch shows us. Runs until cancelled."""
        await wait_reachable(self._app)
        self.surface = await discover(self._app)
        self.record = InstanceRecord(
            id=self._instance_id,
            service=self._service,
            address=self._address,
            zone=self._zone,
            weight=self._weight,
            grpc_services=self.surface.grpc_services,
            unary_methods=self.surface.unary_methods,
            version=self._version,
            started_at=time.time(),
        )
        await self._keeper.put(self.key, self.record.to_json())
        keeping = asyncio.create_task(self._keeper.run(), name="lease-keeper")
        try:
            await self._keeper.granted.wait()
            await self._wait_until_routed()
            registered()
            await keeping
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping

    async def _wait_until_routed(self) -> None:
        try:
            async with asyncio.timeout(ROUTED_PATIENCE):
                await self._routed.wait()
        except TimeoutError:
            log.warning(
                "registered in etcd, but the topology watch has not shown this instance"
                " after %.0f s: not ready until it does",
                ROUTED_PATIENCE,
            )
            await self._routed.wait()

    async def mark_draining(self) -> None:
        """Peers stop choosing this instance for new calls."""
        if self.record is not None and self._keeper.lease_id is not None:
            log.info("draining: peers stop choosing this instance for new calls")
            await self._keeper.put(self.key, replace(self.record, state=DRAINING).to_json())

    async def deregister(self) -> None:
        await self._keeper.revoke()
