"""The sidecar process: servers, registration, topology, and an orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind

from registry.errors import ConfigError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from registry.lease import LeaseKeeper
from registry.records import DRAINING, InstanceRecord
from registry.topology import Topology, TopologyWatch
from sidecar.admin import AdminServer
from sidecar.channels import SERVER_OPTIONS, ChannelPool
from sidecar.config import SidecarConfig, join_hostport, split_hostport
from sidecar.discovery import AppSurface, discover, wait_reachable
from sidecar.ejection import Ejector
from sidecar.inbound import InboundDirector
from sidecar.load import window_load
from sidecar.otel import TelemetryPipeline, build_pipeline
from sidecar.outbound import OutboundDirector
from sidecar.probes import probe_app, probe_ejected_peers
from sidecar.proxy import ProxyHandler
from sidecar.retry import RetryPolicy
from sidecar.routing import RoutingTable
from sidecar.stats import DataPlaneStats
from sidecar.telemetry import DataPlaneMetrics
from sidecar.tracing import HopTracer

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_DRAIN_SETTLE = 0.3  # seconds for peers' watches to see "draining"
_DRAIN_QUIET = 0.2  # ... and then no new call for this long
_ROUTED_PATIENCE = 5.0  # seconds before saying that our own watch has not shown us


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
        self.stats = DataPlaneStats()
        self.retry = RetryPolicy(idempotent=config.idempotent)
        self.outbound = OutboundDirector(
            retry=self.retry, new_ejector=lambda: Ejector(clock=clock), stats=self.stats
        )
        self.inbound = InboundDirector(config.app, on_app_state=self._app_state_changed)
        self._surface = AppSurface()
        self._out_pool = ChannelPool()
        self._in_pool = ChannelPool()
        self._out_handler = ProxyHandler(
            self.outbound,
            self._out_pool,
            unary_methods=lambda: self.outbound.table.unary_methods,
            retry=self.retry,
            stats=self.stats,
        )
        self._in_handler = ProxyHandler(
            self.inbound, self._in_pool, unary_methods=lambda: self._surface.unary_methods
        )
        self._health = health.aio.HealthServicer()
        self._latest: Topology | None = None
        self._rebuild_scheduled = False
        self._background: set[asyncio.Task[None]] = set()
        self.registered = False
        self._draining = False
        self._record: InstanceRecord | None = None
        # Set once the routing table holds this instance: "registered" (and ready)
        # then also means the topology has been read, so the app's first call routes.
        self._routes_self = asyncio.Event()

    def _app_state_changed(self, up: bool) -> None:
        """The app stopped (or started) answering: peers' health probes should see it."""
        if not self.registered:
            return
        log.warning("app at %s is %s", self.config.app, "reachable again" if up else "unreachable")
        self._spawn(self._health.set("", _health_status(up)))

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
        self.outbound.set_table(table)
        if self._record is not None and not self._routes_self.is_set():
            # Our record as we put it (not one an earlier run left under the same id).
            entry = self._latest.services.get(self._record.service, {}).get(self._record.id)
            if entry is not None and entry.record == self._record:
                self._routes_self.set()
        if table.unary_methods != old.unary_methods:
            self._out_handler.forget_handlers()
        # Keep channels to draining instances too: calls may still be in flight there.
        registered = self._latest.services.values()
        addresses = {entry.record.address for ids in registered for entry in ids.values()}
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
        try:
            outbound, outbound_port = await self._start_server(
                config.outbound, self._out_handler, with_health=False
            )
        except BaseException:
            await inbound.stop(0)  # a server left to the garbage collector outlives the loop
            raise
        instance_id = config.instance_id or config.default_instance_id(inbound_port)
        telemetry = self._start_telemetry(instance_id)
        admin_host, admin_port = split_hostport(config.admin, what="--admin address")
        admin = AdminServer(
            admin_host,
            admin_port,
            ready=lambda: self.registered and not self._draining,
            stats=self.snapshot,
            metrics=telemetry.prometheus_text,
        )
        try:
            await admin.start()
        except OSError as exc:
            await asyncio.gather(inbound.stop(0), outbound.stop(0))
            telemetry.shutdown()
            raise ConfigError(f"cannot listen on --admin {config.admin}: {exc}") from exc
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

        failure: BaseException | None = None
        try:
            async with EtcdClient(config.etcd) as etcd:
                watch = TopologyWatch(etcd, self.layout, on_change=self._on_topology)
                keeper = LeaseKeeper(etcd, ttl=config.ttl, clock=self._clock)
                tasks = [
                    asyncio.create_task(watch.run(), name="topology-watch"),
                    asyncio.create_task(
                        probe_ejected_peers(self.outbound, self._out_pool), name="probe-ejected"
                    ),
                    asyncio.create_task(
                        probe_app(self.inbound, self._in_pool, config.app), name="probe-app"
                    ),
                    asyncio.create_task(
                        self._report_load(keeper, telemetry, instance_id), name="load"
                    ),
                    asyncio.create_task(
                        self._register(keeper, instance_id, address, ports), name="register"
                    ),
                ]
                stopping = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
                    failure = _first_failure(tasks)
                    if failure is not None:
                        # Still drain: the calls in flight deserve their answers.
                        log.error("stopping after an error: %s", failure)
                    await self._shutdown(keeper, inbound, outbound)
                finally:
                    for task in (stopping, *tasks):
                        task.cancel()
                    await asyncio.gather(stopping, *tasks, return_exceptions=True)
                    failure = failure or _first_failure(tasks)  # one that failed while draining
        finally:
            await asyncio.gather(inbound.stop(0), outbound.stop(0), return_exceptions=True)
            await admin.aclose()
            for task in list(self._background):
                task.cancel()
            await self._out_pool.aclose()
            await self._in_pool.aclose()
            telemetry.shutdown()
        if failure is not None:
            raise failure
        announce("stopped", service=config.service, instance_id=instance_id)

    def _start_telemetry(self, instance_id: str) -> TelemetryPipeline:
        telemetry = build_pipeline(
            service=self.config.service,
            instance_id=instance_id,
            otlp_endpoint=self.config.otlp_endpoint,
        )
        meter = telemetry.meter_provider.get_meter("ringmesh.sidecar", VERSION)
        metrics = DataPlaneMetrics(meter, self.stats, inflight=self._inflight_by_direction)
        self._in_handler.recorder = metrics.server
        self._out_handler.recorder = metrics.client
        if telemetry.tracer_provider is not None:
            tracer = telemetry.tracer_provider.get_tracer("ringmesh.sidecar", VERSION)
            self._in_handler.tracing = HopTracer(tracer, kind=SpanKind.SERVER)
            self._out_handler.tracing = HopTracer(tracer, kind=SpanKind.CLIENT)
        return telemetry

    def _inflight_by_direction(self) -> dict[str, int]:
        inbound = self.inbound.inflight
        return {"inbound": inbound, "outbound": self.inflight() - inbound}

    async def _report_load(
        self, keeper: LeaseKeeper, telemetry: TelemetryPipeline, instance_id: str
    ) -> None:
        """Every report interval, the load/ record from the same histogram /metrics serves."""
        key = self.layout.load(self.config.service, instance_id)
        previous = telemetry.server_totals()
        busy = self.inbound.busy_seconds()
        while True:
            await asyncio.sleep(self.config.report_interval)
            now, busy_now = telemetry.server_totals(), self.inbound.busy_seconds()
            reading = window_load(previous, now, busy_s=busy_now - busy, wall=time.time())
            previous, busy = now, busy_now
            if self.registered:
                await keeper.put(key, reading.to_json())

    async def _register(
        self, keeper: LeaseKeeper, instance_id: str, address: str, ports: dict[str, Any]
    ) -> None:
        config = self.config
        await wait_reachable(config.app)
        self._surface = await discover(config.app)
        self._in_handler.forget_handlers()
        self._record = InstanceRecord(
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
        await keeper.put(self._record_key, self._record.to_json())
        run = asyncio.create_task(keeper.run(), name="lease-keeper")
        try:
            await keeper.granted.wait()
            await self._wait_until_routed()
            if not self._draining:  # a SIGTERM may have come while we waited
                # Calls may have reached the app meanwhile: its state is known.
                await self._health.set("", _health_status(self.inbound.app_up))
                self.registered = True
                announce("registered", **ports)
            await run
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            self.registered = False

    async def _wait_until_routed(self) -> None:
        """Until our own watch has shown our record (milliseconds, normally)."""
        try:
            async with asyncio.timeout(_ROUTED_PATIENCE):
                await self._routes_self.wait()
        except TimeoutError:
            log.warning(
                "registered in etcd, but the topology watch has not shown this instance"
                " after %.0f s: not ready until it does",
                _ROUTED_PATIENCE,
            )
            await self._routes_self.wait()

    @property
    def _record_key(self) -> str:
        assert self._record is not None
        return self.layout.instance(self._record.service, self._record.id)

    def snapshot(self) -> dict[str, Any]:
        """What ``/stats`` serves: the data plane's counters and what it is doing now."""
        return {
            **self.stats.snapshot(),
            "inflight": self._inflight_by_direction(),
            "ejected": {
                service: sorted(self.outbound.ejector(service).ejected())
                for service in self.outbound.table.rings
            },
            "registered": self.registered,
            "topology_revision": self.outbound.table.revision,
        }

    def _calls_in_progress(self) -> int:
        """Calls this sidecar has not answered yet, both directions, including
        outbound calls waiting between attempts (not counted at any peer)."""
        return self._in_handler.active + self._out_handler.active

    def inflight(self) -> int:
        """Calls in flight through this sidecar, both directions."""
        return self.inbound.inflight + sum(
            sum(loads.values()) for loads in self.outbound.inflight.values()
        )

    async def _shutdown(
        self, keeper: LeaseKeeper, inbound: grpc.aio.Server, outbound: grpc.aio.Server
    ) -> None:
        """Drain: mark draining, serve in-flight and late calls, deregister, stop."""
        self._draining = True
        grace = self.config.drain_grace
        deadline = self._clock() + grace
        if self._record is not None and keeper.lease_id is not None:
            log.info("draining: peers stop choosing this instance for new calls")
            await keeper.put(self._record_key, replace(self._record, state=DRAINING).to_json())
        await self._health.enter_graceful_shutdown()
        # Peers learn of the drain through their watch within milliseconds;
        # calls they sent before that still arrive and are served. The drain
        # ends once nothing is in flight and no call has arrived for a while:
        # a peer whose watch lags on a busy machine may still be sending.
        await asyncio.sleep(min(_DRAIN_SETTLE, grace))
        while self._clock() < deadline and (  # noqa: ASYNC110 - counters, no event to wait on
            self._calls_in_progress() > 0 or self.inbound.quiet_for() < _DRAIN_QUIET
        ):
            await asyncio.sleep(0.02)
        if self._calls_in_progress() > 0:
            log.warning(
                "drain grace of %ss ran out with %d call(s) in flight",
                grace,
                self._calls_in_progress(),
            )
        await keeper.revoke()
        await asyncio.gather(inbound.stop(1.0), outbound.stop(1.0))


def _health_status(app_up: bool) -> Any:
    """What this sidecar's grpc.health.v1 says: SERVING while its app answers."""
    if app_up:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def _first_failure(tasks: list[asyncio.Task[Any]]) -> BaseException | None:
    """The error of the first background task that ended with one, if any."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            return task.exception()
    return None
