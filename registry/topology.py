"""The live topology: every instance record under ``instances/``, kept current by a watch.

The watch is registry/watch.py's PrefixWatch: list, then watch from that
revision + 1; re-watch on a broken connection, re-list on a compacted
revision. While etcd is unreachable the last topology stays in force: a
broken watch is never read as "everything was deleted".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from registry.errors import InvalidName, RecordError
from registry.etcd import EtcdClient, KeyValue
from registry.keys import KeyLayout
from registry.lease import Backoff, Sleep
from registry.records import InstanceRecord, parse_or_skip
from registry.watch import PrefixWatch, watch_backoff

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
        frozen = {name: _frozen(ids) for name, ids in sorted(services.items())}
        return cls(revision=revision, services=MappingProxyType(frozen))

    def changed(
        self, revision: int, service: str, instance_id: str, entry: Registered | None
    ) -> Topology:
        """This snapshot with one instance put (``entry``) or gone (None): only that
        service's map is new, every other one is shared (by identity, which
        RoutingTable.build uses to skip the services a change did not touch)."""
        ids = dict(self.services.get(service, {}))
        if entry is None:
            ids.pop(instance_id, None)
        else:
            ids[instance_id] = entry
        services = {k: v for k, v in self.services.items() if k != service}
        if ids:
            services[service] = _frozen(ids)
        return Topology(
            revision=revision, services=MappingProxyType(dict(sorted(services.items())))
        )


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
    """Keeps a Topology current and hands each new snapshot to ``on_change``.

    Over the whole ``instances/`` prefix, or with ``services`` only over theirs
    (one watch each, as Envoy's on-demand discovery asks only for what it
    routes to): a sidecar of a 10,000-instance mesh that calls two services
    then lists, holds and rebuilds only their instances. The first snapshot is
    handed over once every watch has listed, so no service looks unknown
    meanwhile.
    """

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        *,
        on_change: Callable[[Topology], None] = lambda _t: None,
        services: Sequence[str] = (),
        sleep: Sleep = asyncio.sleep,
        backoff: Callable[[], Backoff] = watch_backoff,
    ) -> None:
        self._on_change = on_change
        self._layout = layout
        self.topology = Topology()
        self.ready = asyncio.Event()  # set after every watch's first listing

        def parse(key: str, value: bytes, *, lease: int, mod_revision: int) -> Registered:
            return parse_entry(layout, key, value, lease=lease, mod_revision=mod_revision)

        scopes = [(layout.service_instances(s), f"topology of {s!r}") for s in services]
        self._watches = [
            PrefixWatch(
                client,
                prefix,
                parse=parse,
                on_change=self._publish,
                logger=log,
                name=name,
                keeping="routing on the last topology",
                sleep=sleep,
                backoff=backoff,
            )
            for prefix, name in scopes or [(layout.instances, "topology")]
        ]

    @property
    def revision(self) -> int:
        """The last revision applied (the newest of its watches)."""
        return max(w.revision for w in self._watches)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for watch in self._watches:
                group.create_task(watch.run())

    def _publish(
        self, revision: int, entries: Mapping[str, Registered], changed: str | None
    ) -> None:
        if not all(w.revision > 0 for w in self._watches):
            return  # not every watch has listed yet: no service may look unknown
        service = None if changed is None else self._service_of(changed)
        if changed is None or service is None or not self.ready.is_set():
            every = (e for w in self._watches for e in w.entries.values())
            self.topology = Topology.build(self.revision, every)
        else:
            name, instance_id = service
            self.topology = self.topology.changed(
                self.revision, name, instance_id, entries.get(changed)
            )
        self.ready.set()
        self._on_change(self.topology)

    def _service_of(self, key: str) -> tuple[str, str] | None:
        """(service, instance id) of an ``instances/`` key; None for a key that is not one."""
        try:
            return self._layout.parse_instance(key)
        except InvalidName:
            return None


def _frozen(ids: Mapping[str, Registered]) -> Mapping[str, Registered]:
    return MappingProxyType(dict(sorted(ids.items())))
