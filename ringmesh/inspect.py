"""`ringmesh topology` and `ringmesh route`: what the mesh looks like, straight from etcd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from registry.election import Candidate, read_leader
from registry.errors import EtcdUnavailable
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_service
from registry.scaling import Target
from registry.topology import Topology, TopologyWatch, read_topology
from scaler.leader import read_targets
from sidecar.routing import RoutingTable

log = logging.getLogger(__name__)

WATCH_POLL_SECONDS = 1.0  # how often `topology --watch` re-reads targets and the leader


async def _lease_ttls(client: EtcdClient, topology: Topology) -> dict[int, int]:
    leases = {e.lease for ids in topology.services.values() for e in ids.values() if e.lease}
    ttls: dict[int, int] = {}
    for lease in sorted(leases):
        try:
            ttls[lease] = await client.lease_ttl(lease)
        except EtcdUnavailable:
            ttls[lease] = -1
    return ttls


@dataclass(frozen=True)
class Scaling:
    """What the scaler decided: targets per service and who leads."""

    targets: dict[str, Target]
    leader: Candidate | None


async def _scaling(client: EtcdClient, layout: KeyLayout) -> Scaling:
    return Scaling(await read_targets(client, layout), await read_leader(client, layout))


def topology_document(topology: Topology, ttls: dict[int, int], scaling: Scaling) -> dict[str, Any]:
    """The JSON form of `ringmesh topology --json`."""
    table = RoutingTable.build(topology)
    services: dict[str, Any] = {}
    for service in sorted(set(topology.services) | set(scaling.targets)):
        ids = topology.services.get(service, {})
        ring = table.rings.get(service)
        shares = ring.shares() if ring is not None else {}
        target = scaling.targets.get(service)
        services[service] = {
            "live": sum(1 for entry in ids.values() if entry.record.serving),
            "target": None if target is None else target.replicas,
            "target_reason": None if target is None else target.reason,
            "instances": [
                {
                    "id": entry.record.id,
                    "address": entry.record.address,
                    "zone": entry.record.zone,
                    "state": entry.record.state,
                    "weight": entry.record.weight,
                    "ring_share": round(shares.get(entry.record.id, 0.0), 4),
                    "lease": f"{entry.lease:x}",
                    "lease_ttl": ttls.get(entry.lease, -1),
                    "grpc_services": list(entry.record.grpc_services),
                    "version": entry.record.version,
                }
                for entry in ids.values()
            ],
        }
    leader = scaling.leader
    return {
        "revision": topology.revision,
        "leader": None if leader is None else {"id": leader.id, "term": leader.term},
        "services": services,
    }


def render_topology(doc: dict[str, Any], out: TextIO) -> None:
    header = ("SERVICE", "INSTANCE", "ADDRESS", "ZONE", "STATE", "WEIGHT", "SHARE", "TTL")
    rows = [header]
    for service, body in doc["services"].items():
        for inst in body["instances"]:
            rows.append((
                service, inst["id"], inst["address"], inst["zone"] or "-", inst["state"],
                str(inst["weight"]), f"{inst['ring_share'] * 100:.1f}%",
                f"{inst['lease_ttl']}s" if inst["lease_ttl"] >= 0 else "-",
            ))  # fmt: skip
    if len(rows) == 1:
        out.write(f"no instances registered (revision {doc['revision']})\n")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            out.write("  ".join(cells).rstrip() + "\n")
    for service, body in doc["services"].items():
        if body["target"] is not None:
            out.write(
                f"{service}: {body['live']} live, target {body['target']} ({body['target_reason']})\n"
            )
    leader = doc["leader"]
    scaler = (
        "no scaler leads"
        if leader is None
        else f"scaler leader {leader['id']} (term {leader['term']})"
    )
    out.write(f"revision {doc['revision']}; {scaler}\n")


async def topology_command(
    client: EtcdClient, layout: KeyLayout, *, as_json: bool, watch: bool
) -> int:
    if not watch:
        topology = await read_topology(client, layout)
        await _emit_current(client, topology, await _scaling(client, layout), as_json)
        return 0
    changed = asyncio.Event()
    watcher = TopologyWatch(client, layout, on_change=lambda _t: changed.set())
    task = asyncio.create_task(watcher.run())
    shown: tuple[int, Scaling] | None = None
    try:
        await changed.wait()  # the first listing
        while True:
            changed.clear()
            # Instances come from the watch; targets and the leader are read
            # every poll interval, so a new target or leader prints too.
            try:
                scaling = await _scaling(client, layout)
            except EtcdUnavailable:
                pass  # the watch logs the outage; print again once etcd is back
            else:
                if (watcher.topology.revision, scaling) != shown:
                    shown = (watcher.topology.revision, scaling)
                    await _emit_current(client, watcher.topology, scaling, as_json)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_POLL_SECONDS):
                    await changed.wait()
    finally:
        task.cancel()


async def _emit_current(
    client: EtcdClient, topology: Topology, scaling: Scaling, as_json: bool
) -> None:
    ttls = await _lease_ttls(client, topology)
    _emit(topology_document(topology, ttls, scaling), as_json)


def _emit(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        render_topology(doc, sys.stdout)
    sys.stdout.flush()


async def route_command(
    client: EtcdClient, layout: KeyLayout, service: str, key: str, *, as_json: bool
) -> int:
    validate_service(service)
    table = RoutingTable.build(await read_topology(client, layout))
    order = table.route(service, key)
    if as_json:
        doc = {
            "service": service,
            "key": key,
            "owner": order[0].id,
            "order": [{"id": p.id, "address": p.address} for p in order],
        }
        sys.stdout.write(json.dumps(doc) + "\n")
        return 0
    for i, peer in enumerate(order):
        role = "owner" if i == 0 else f"failover {i}"
        sys.stdout.write(f"{role:<11} {peer.id}  {peer.address}\n")
    return 0


def count_serving(etcd_url: str, prefix: str, service: str) -> int:
    """How many instances of ``service`` serve now (a blocking helper for scripts)."""
    from registry.etcd import EtcdConfig

    async def count() -> int:
        async with EtcdClient(EtcdConfig.from_urls(etcd_url)) as client:
            topology = await read_topology(client, KeyLayout(prefix))
        return sum(1 for record in topology.instances(service) if record.serving)

    return asyncio.run(count())
