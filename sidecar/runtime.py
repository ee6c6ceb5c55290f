"""The sidecar process: servers, registration, topology, and an orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from registry.errors import ConfigError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from registry.lease import LeaseKeeper
from registry.records import InstanceRecord
from registry.topology import Topology, TopologyWatch
from sidecar.admin import AdminServer
from sidecar.config import SidecarConfig, join_hostport, split_hostport
from sidecar.discovery import AppSurface, discover, wait_reachable
from sidecar.inbound import InboundDirector
from sidecar.outbound import OutboundDirector
from sidecar.proxy import SERVER_OPTIONS, ChannelPool, ProxyHandler
from sidecar.routing import RoutingTable

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout per lifecycle event (what scripts and tests wait for)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Sidecar:
    """One instance's sidecar; ``run(stop)`` serves until ``stop`` is set, then drains."""

    def __init__(
        self, config: SidecarConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.layout = KeyLayout(config.prefix)
        self.outbound = OutboundDirector()
        self.inbound = InboundDirector(config.app)
        self._surface = AppSurface()
        self._out_pool = ChannelPool()
        self._in_pool = ChannelPool()
        self._out_handler = ProxyHandler(
            self.outbound, self._out_pool, unary_methods=lambda: self.outbound.table.unary_methods
        )
        self._in_handler = ProxyHandler(
            self.inbound, self._in_pool, unary_methods=lambda: self._surface.unary_methods
        )
        self._health = health.aio.HealthServicer()
        self._latest: Topology | None = None
        self._rebuild_scheduled = False
        self._background: set[asyncio.Task[None]] = set()
        self.registered = False

    # -- routing state: rebuilt off the hot path, swapped whole -------------------

    def _on_topology(self, topology: Topology) -> None:
        self._latest = topology
        if not self._rebuild_scheduled:
            self._rebuild_scheduled = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_scheduled = False
        if self._latest is None:
            return
        old = self.outbound.table
        table = RoutingTable.build(self._latest, previous=old)
        self.outbound.table = table
        if table.unary_methods != old.unary_methods:
            self._out_handler.forget_handlers()
        addresses = {p.address for ring in table.rings.values() for p in ring.peers.values()}
        self._spawn(self._out_pool.retain(addresses))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle ----------------------------------------------------------------

    async def _start_server(
        self, address: str, handler: ProxyHandler, *, with_health: bool
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        if with_health:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers([handler])
        host, port = split_hostport(address, what="address")
        try:
            bound = server.add_insecure_port(join_hostport(host, port))
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from exc
        if bound == 0:
            raise ConfigError(f"cannot listen on {address}: address in use or not available")
        await server.start()
        return server, bound

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        inbound, inbound_port = await self._start_server(
            config.inbound, self._in_handler, with_health=True
        )
        outbound, outbound_port = await self._start_server(
            config.outbound, self._out_handler, with_health=False
        )
        admin_host, admin_port = split_hostport(config.admin, what="--admin address")
        admin = AdminServer(admin_host, admin_port, ready=lambda: self.registered)
        try:
            await admin.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on --admin {config.admin}: {exc}") from exc
        instance_id = config.instance_id or config.default_instance_id(inbound_port)
        address = config.advertised(inbound_port)
        ports = {
            "service": config.service,
            "instance_id": instance_id,
            "address": address,
            "outbound": join_hostport(split_hostport(config.outbound, what="")[0], outbound_port),
            "inbound": join_hostport(split_hostport(config.inbound, what="")[0], inbound_port),
            "admin": join_hostport(admin_host, admin.port),
        }
        announce("listening", **ports)

        async with EtcdClient(config.etcd) as etcd:
            watch = TopologyWatch(etcd, self.layout, on_change=self._on_topology)
            keeper = LeaseKeeper(etcd, ttl=config.ttl, clock=self._clock)
            tasks = [
                asyncio.create_task(watch.run(), name="topology-watch"),
                asyncio.create_task(
                    self._register(keeper, instance_id, address, ports), name="register"
                ),
            ]
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await self._shutdown(keeper, inbound, outbound)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await admin.aclose()
        for task in list(self._background):
            task.cancel()
        await self._out_pool.aclose()
        await self._in_pool.aclose()
        announce("stopped", service=config.service, instance_id=instance_id)

    async def _register(
        self, keeper: LeaseKeeper, instance_id: str, address: str, ports: dict[str, Any]
    ) -> None:
        config = self.config
        await wait_reachable(config.app)
        self._surface = await discover(config.app)
        self._in_handler.forget_handlers()
        record = InstanceRecord(
            id=instance_id,
            service=config.service,
            address=address,
            zone=config.zone,
            weight=config.weight,
            grpc_services=self._surface.grpc_services,
            unary_methods=self._surface.unary_methods,
            version=VERSION,
            started_at=time.time(),
        )
        await keeper.put(self.layout.instance(config.service, instance_id), record.to_json())
        run = asyncio.create_task(keeper.run(), name="lease-keeper")
        try:
            await keeper.granted.wait()
            await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
            self.registered = True
            announce("registered", **ports)
            await run
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            self.registered = False

    async def _shutdown(
        self, keeper: LeaseKeeper, inbound: grpc.aio.Server, outbound: grpc.aio.Server
    ) -> None:
        """SIGTERM: deregister at once, finish what is in flight, stop."""
        log.info("shutting down: deregistering, then finishing in-flight calls")
        await self._health.enter_graceful_shutdown()
        await keeper.revoke()
        grace = self.config.drain_grace
        await asyncio.gather(inbound.stop(grace), outbound.stop(grace))
