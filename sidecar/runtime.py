"""The sidecar process: the native data plane, its registration, topology and telemetry,
and an orderly drain.

The hop itself runs in Rust (``sidecar/plane.py`` is the seam); this module
is the control plane around it: it pushes routing snapshots in as the watch
delivers them, registers the instance, reports load, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from registry.authz import AuthzWatch
from registry.errors import ConfigError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from registry.lease import LeaseKeeper
from registry.policy_watch import PolicyWatch
from registry.topology import Topology, TopologyWatch
from sidecar.admin import AdminServer
from sidecar.config import SidecarConfig, join_hostport, split_hostport
from sidecar.drain import drain
from sidecar.load import Written, window_load, worth_writing
from sidecar.otel import TelemetryPipeline, build_pipeline
from sidecar.plane import NativePlane
from sidecar.registration import Registration
from sidecar.routing import RoutingTable

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_EXPORT_INTERVAL = 1.0  # seconds between span exports (with OTLP)
_SHUTDOWN_GRACE = 1.0  # after the drain: GOAWAY, then this long for stragglers


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout per lifecycle event (what scripts and tests wait for)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Sidecar:
    """One instance's sidecar; ``run(stop)`` serves until ``stop`` is set, then drains."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self.layout = KeyLayout(config.prefix)
        self.plane = NativePlane(config, tracing=bool(config.otlp_endpoint))
        self.table = RoutingTable()
        self._latest: Topology | None = None
        self._rebuild_scheduled = False
        self._registration: Registration | None = None
        self._policy: PolicyWatch | None = None
        self._routing = asyncio.Event()  # the first topology is installed
        self.registered = False
        self._draining = False

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
        self.table = RoutingTable.build(
            self._latest, previous=self.table, watching=self.config.watched()
        )
        self.plane.install(self.table)
        self._routing.set()
        if self._registration is not None:
            self._registration.saw(self._latest)

    # -- lifecycle ----------------------------------------------------------------

    def ready(self) -> bool:
        """/ready: routing (and registered, with an app), not draining."""
        if self._draining:
            return False
        return self.registered if self.config.app is not None else self._routing.is_set()

    async def run(self, stop: asyncio.Event) -> None:
        outbound_port, inbound_port = self.plane.start()
        try:
            await self._serve(stop, outbound_port, inbound_port)
        finally:
            await asyncio.to_thread(self.plane.shutdown, 0.0)  # already drained: a no-op then

    async def _serve(
        self, stop: asyncio.Event, outbound_port: int, inbound_port: int | None
    ) -> None:
        config = self.config
        instance_id = config.instance_id or config.default_instance_id(
            inbound_port or outbound_port
        )
        telemetry = build_pipeline(
            service=config.service,
            instance_id=instance_id,
            otlp_endpoint=config.otlp_endpoint,
            read_stats=self.plane.stats,
            take_spans=self.plane.take_spans,
        )
        admin_host, admin_port = split_hostport(config.admin, what="--admin address")
        admin = AdminServer(
            admin_host,
            admin_port,
            ready=self.ready,
            stats=self.snapshot,
            metrics=telemetry.prometheus_text,
        )
        try:
            await admin.start()
        except OSError as exc:
            telemetry.shutdown()
            raise ConfigError(f"cannot listen on --admin {config.admin}: {exc}") from exc
        outbound_host = split_hostport(config.outbound, what="")[0]
        ports: dict[str, Any] = {
            "service": config.service,
            "instance_id": instance_id,
            "outbound": join_hostport(outbound_host, outbound_port),
            "admin": join_hostport(admin_host, admin.port),
        }
        if inbound_port is not None:
            ports["address"] = config.advertised(inbound_port)
            ports["inbound"] = join_hostport(
                split_hostport(config.inbound, what="")[0], inbound_port
            )
        announce("listening", **ports)
        try:
            async with EtcdClient(config.etcd) as etcd:
                await self._run_loops(etcd, stop, telemetry, instance_id, ports)
        finally:
            await admin.aclose()
            telemetry.shutdown()
        announce("stopped", service=config.service, instance_id=instance_id)

    async def _run_loops(
        self,
        etcd: EtcdClient,
        stop: asyncio.Event,
        telemetry: TelemetryPipeline,
        instance_id: str,
        ports: dict[str, Any],
    ) -> None:
        """Every background loop in one TaskGroup; on stop (or a loop's failure) drain, then end them."""
        config = self.config
        keeper = LeaseKeeper(etcd, ttl=config.ttl, clock=self._clock)
        watch = TopologyWatch(
            etcd, self.layout, on_change=self._on_topology, services=config.watched()
        )
        authz = AuthzWatch(etcd, self.layout, on_change=self.plane.set_authz)
        loops: dict[str, Coroutine[Any, Any, None]] = {
            "topology-watch": watch.run(),
            "authz-watch": authz.run(),
        }
        if config.app is not None:
            self._registration = Registration(
                layout=self.layout,
                keeper=keeper,
                service=config.service,
                instance_id=instance_id,
                address=ports["address"],
                app=config.app,
                zone=config.zone,
                weight=config.weight,
                version=VERSION,
            )
            loops["register"] = self._registration.run(registered=lambda: self._registered(ports))
            self._policy = PolicyWatch(etcd, self.layout, config.service)
            loops["policy-watch"] = self._policy.run()
            loops["load"] = self._report_load(keeper, telemetry, instance_id, self._policy)
        else:
            loops["ready"] = self._announce_ready(ports)
        if config.otlp_endpoint:
            loops["export"] = self._export(telemetry)
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_guarded(name, loop, failed), name=name)
                for name, loop in loops.items()
            ]
            stopping = group.create_task(stop.wait())
            waiting: list[asyncio.Future[Any]] = [stopping, failed]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                # Still drain: the calls in flight deserve their answers.
                log.error("stopping after an error: %s", failed.result())
            await self._drain()
            for task in (*tasks, stopping):
                task.cancel()
        if failed.done():
            raise failed.result()

    def _registered(self, ports: dict[str, Any]) -> None:
        if self._draining:  # a SIGTERM may have come while we waited
            return
        self.registered = True
        self.plane.set_registered(True)
        announce("registered", **ports)

    async def _announce_ready(self, ports: dict[str, Any]) -> None:
        """A client-only sidecar registers nothing: it is ready once it routes."""
        await self._routing.wait()
        announce("ready", **ports)
        await asyncio.Event().wait()

    async def _report_load(
        self,
        keeper: LeaseKeeper,
        telemetry: TelemetryPipeline,
        instance_id: str,
        policy: PolicyWatch,
    ) -> None:
        """Every report interval, a reading from the same histogram /metrics serves; written
        to load/ only when the metric the service scales on changed or the last write is
        old (``worth_writing``)."""
        key = self.layout.load(self.config.service, instance_id)
        previous = telemetry.server_totals()
        busy = self.plane.busy_seconds()
        written: Written | None = None
        while True:
            await self._sleep(self.config.report_interval)
            now, busy_now = telemetry.server_totals(), self.plane.busy_seconds()
            reading = window_load(previous, now, busy_s=busy_now - busy, wall=time.time())
            previous, busy = now, busy_now
            at = self._clock()
            if self.registered and worth_writing(reading, written, now=at, scaled_on=policy.metric):
                await keeper.put(key, reading.to_json())
                written = Written(reading, at)

    async def _export(self, telemetry: TelemetryPipeline) -> None:
        while True:
            await self._sleep(_EXPORT_INTERVAL)
            await asyncio.to_thread(telemetry.export)

    def snapshot(self) -> dict[str, Any]:
        """What ``/stats`` serves: the data plane's counters and what it is doing now."""
        stats = self.plane.stats()
        for series in ("server", "client"):
            stats.pop(series, None)
        return {
            **stats,
            "registered": self.registered,
            "topology_revision": self.plane.revision(),
            # the load/ field whose change is written at once (the others ride along)
            "load_scaled_on": None if self._policy is None else self._policy.metric,
        }

    async def _drain(self) -> None:
        """Mark draining, serve in-flight and late calls, deregister, stop."""
        self._draining = True
        self.plane.set_draining()
        registration = self._registration
        if registration is not None:
            await registration.mark_draining()
        left = await drain(
            self.plane, grace=self.config.drain_grace, clock=self._clock, sleep=self._sleep
        )
        if left > 0:
            log.warning(
                "drain grace of %ss ran out with %d call(s) in flight",
                self.config.drain_grace,
                left,
            )
        if registration is not None:
            await registration.deregister()
        self.registered = False
        await asyncio.to_thread(self.plane.shutdown, _SHUTDOWN_GRACE)


async def _guarded(
    name: str, loop: Coroutine[Any, Any, None], failed: asyncio.Future[BaseException]
) -> None:
    """A background loop whose error stops the sidecar (after a drain), not the TaskGroup."""
    try:
        await loop
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not failed.done():
            failed.set_result(exc)
