"""The live topology: every instance record under ``instances/``, kept current by a watch.

List the prefix, then watch from that revision + 1, tracking each event's
mod_revision. On a broken connection re-watch from the last revision + 1; on
a compacted revision re-list. While etcd is unreachable the last topology
stays in force: a broken watch is never read as "everything was deleted".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from registry.errors import EtcdError, EtcdUnavailable, InvalidName, RecordError, RevisionCompacted
from registry.etcd import EtcdClient, KeyValue, WatchEvent
from registry.keys import KeyLayout
from registry.lease import Sleep
from registry.outage import OutageLog
from registry.records import InstanceRecord, parse_or_skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    """An instance record with what etcd knows about it."""

    record: InstanceRecord
    lease: int
    mod_revision: int


@dataclass(frozen=True)
class Topology:
    """An immutable snapshot: service -> instance id -> Registered."""

    revision: int = 0
    services: Mapping[str, Mapping[str, Registered]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def instances(self, service: str) -> list[InstanceRecord]:
        return [r.record for r in self.services.get(service, {}).values()]

    @classmethod
    def build(cls, revision: int, entries: Iterable[Registered]) -> Topology:
        services: dict[str, dict[str, Registered]] = {}
        for entry in entries:
            services.setdefault(entry.record.service, {})[entry.record.id] = entry
        frozen = {
            name: MappingProxyType(dict(sorted(ids.items())))
            for name, ids in sorted(services.items())
        }
        return cls(revision=revision, services=MappingProxyType(frozen))


def parse_entry(
    layout: KeyLayout, key: str, value: bytes, *, lease: int, mod_revision: int
) -> Registered:
    """Parse one ``instances/`` key and value; RecordError if it does not belong there."""
    try:
        service, instance_id = layout.parse_instance(key)
    except InvalidName as exc:
        raise RecordError(f"bad key: {exc}") from exc
    record = InstanceRecord.from_json(value)
    if (record.service, record.id) != (service, instance_id):
        raise RecordError(
            f"record names {record.service}/{record.id}, key names {service}/{instance_id}"
        )
    return Registered(record, lease, mod_revision)


async def read_topology(client: EtcdClient, layout: KeyLayout) -> Topology:
    """One consistent listing of every instance (what `ringmesh topology` prints)."""
    kvs, revision = await client.get_prefix(layout.instances)
    entries = _parse_listing(layout, kvs)
    return Topology.build(revision, entries.values())


def _parse_listing(layout: KeyLayout, kvs: Iterable[KeyValue]) -> dict[str, Registered]:
    def parse(kv: KeyValue) -> tuple[str, Registered]:
        entry = parse_entry(layout, kv.key, kv.value, lease=kv.lease, mod_revision=kv.mod_revision)
        return kv.key, entry

    return dict(parse_or_skip(kvs, parse, log))


class TopologyWatch:
    """Keeps a Topology current and hands each new snapshot to ``on_change``."""

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        *,
        on_change: Callable[[Topology], None] = lambda _t: None,
        sleep: Sleep = asyncio.sleep,
        retry_interval: float = 0.5,
    ) -> None:
        self._client = client
        self._layout = layout
        self._on_change = on_change
        self._sleep = sleep
        self._retry_interval = retry_interval
        self._entries: dict[str, Registered] = {}
        self.revision = 0  # the last revision applied
        self.topology = Topology()
        self.ready = asyncio.Event()  # set after the first listing
        self._outage = OutageLog(
            log,
            down=lambda exc: (
                f"topology watch broken, routing on the last topology (rev {self.revision}): {exc}"
            ),
            up=lambda: f"topology watch resumed from revision {self.revision + 1}",
        )

    async def run(self) -> None:
        listed = False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                async for event in self._client.watch_prefix(
                    self._layout.instances, start_revision=self.revision + 1
                ):
                    self._outage.recovered()
                    self._apply(event)
            except RevisionCompacted as exc:
                log.warning("watch revision %d compacted (%s): re-listing", self.revision + 1, exc)
                listed = False
            except (EtcdUnavailable, EtcdError) as exc:
                # Never give up: the last topology stays in force meanwhile.
                self._outage.failed(exc)
                await self._sleep(self._retry_interval)

    async def _list(self) -> None:
        kvs, revision = await self._client.get_prefix(self._layout.instances)
        self._outage.recovered()
        self._entries = _parse_listing(self._layout, kvs)
        self.revision = revision
        self._publish()
        self.ready.set()

    def _apply(self, event: WatchEvent) -> None:
        self.revision = max(self.revision, event.revision)
        if event.value is None:
            self._entries.pop(event.key, None)
        else:
            try:
                self._entries[event.key] = parse_entry(
                    self._layout,
                    event.key,
                    event.value,
                    lease=event.lease,
                    mod_revision=event.revision,
                )
            except RecordError as exc:
                log.warning("skipping %s: %s", event.key, exc)
                self._entries.pop(event.key, None)
        self._publish()

    def _publish(self) -> None:
        self.topology = Topology.build(self.revision, self._entries.values())
        self._on_change(self.topology)
