"""The scaler process: campaign, and while leading turn load into fenced replica targets.

Each period the leader reads ``policy/``, ``instances/``, ``load/`` and
``targets/``, asks the Recommender for each service with a policy, shares a
global budget if one is set, writes changed targets in a transaction fenced
on its election key (a deposed leader writes nothing), and hands each target
to the actuator. Wall-clock time: load reports carry wall-clock stamps.

On stdout, one JSON line per event: ``candidate``; ``leading`` with the ``term`` and
``since``; ``following`` with the ``term`` and ``until``, once that leadership is over
(after a resignation at shutdown too). ``since`` and ``until`` bound the election's
``is_leader`` for that term (``registry.election.Tenure``) in ``time.monotonic()``
seconds, which on Linux is one clock for every process of the host: tests compare
two scalers' tenures with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from registry.election import Election
from registry.errors import (
    ConfigError,
    EtcdError,
    EtcdUnavailable,
    MeshError,
    NotLeader,
)
from registry.etcd import EtcdClient, EtcdConfig, KeyValue
from registry.keys import DEFAULT_PREFIX, KeyLayout, validate_instance_id
from registry.outage import OutageLog
from registry.records import parse_or_skip
from registry.scaling import LoadReport, Policy, Target
from registry.topology import read_topology
from scaler.actuators import Actuator
from scaler.budget import BudgetRequest, allocate
from scaler.policy import DEFAULT_STALE_AFTER_S, Decision, Recommender

log = logging.getLogger(__name__)


def announce(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class ScalerConfig:
    scaler_id: str
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    prefix: str = DEFAULT_PREFIX
    interval: float = 2.0
    ttl: int = 10
    max_total_replicas: int | None = None
    # A load report older than this counts as missing. Sidecars rewrite an unchanged
    # record only every 30 s (sidecar.load.RewriteThresholds.max_interval_s), so a
    # live instance's record may be ~31 s old: missing means three rewrites missed.
    stale_after: float = DEFAULT_STALE_AFTER_S

    def __post_init__(self) -> None:
        validate_instance_id(self.scaler_id)
        if not 0.1 <= self.interval <= 3600:
            raise ConfigError(f"--interval must be 0.1-3600 seconds, got {self.interval}")
        if self.ttl < 2:
            raise ConfigError(f"--ttl must be at least 2 seconds, got {self.ttl}")
        if self.max_total_replicas is not None and self.max_total_replicas < 0:
            raise ConfigError(f"--max-total-replicas must be >= 0, got {self.max_total_replicas}")


def _parse_each(
    kvs: list[KeyValue], parse_key: Callable[[str], Any], parse_value: Callable[[bytes], Any]
) -> list[tuple[Any, Any]]:
    """(parsed key, parsed value) pairs; anything that does not parse is logged and skipped."""
    return parse_or_skip(kvs, lambda kv: (parse_key(kv.key), parse_value(kv.value)), log)


async def read_targets(etcd: EtcdClient, layout: KeyLayout) -> dict[str, Target]:
    """Every ``targets/`` record by service (garbage skipped and logged)."""
    kvs, _ = await etcd.get_prefix(layout.targets)
    return dict(_parse_each(kvs, lambda k: layout.parse_last(k, layout.targets), Target.from_json))


class Scaler:
    def __init__(
        self,
        config: ScalerConfig,
        actuator: Actuator,
        *,
        wall: Callable[[], float] = time.time,
        recommender: Recommender | None = None,
    ) -> None:
        self.config = config
        self.layout = KeyLayout(config.prefix)
        self.actuator = actuator
        self._wall = wall
        self.recommender = recommender or Recommender()
        self._outage = OutageLog(
            log, down=lambda exc: f"etcd unreachable, no targets written meanwhile: {exc}"
        )

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        try:
            async with (
                EtcdClient(config.etcd) as etcd,
                Election(
                    etcd, self.layout, candidate_id=config.scaler_id, ttl=config.ttl
                ) as election,
            ):
                announce("candidate", id=config.scaler_id)
                while not stop.is_set():
                    term = await _until(election.campaign(), stop)
                    if term is None:
                        break
                    began = election.tenure_of(term)
                    since = None if began is None else began.since
                    announce("leading", id=config.scaler_id, term=term, since=since)
                    await self._lead(etcd, election, term, stop)
                    if stop.is_set():
                        await election.resign()  # the leadership ends here, not before
                    # Maybe the election leads again already, in a new term.
                    ended = election.tenure_of(term)
                    until = None if ended is None else ended.until
                    announce("following", id=config.scaler_id, term=term, until=until)
                await election.resign()
        finally:
            # Also on a crash: the local actuator's instances run in sessions of their own
            # and would outlive us.
            await self.actuator.aclose()

    async def _lead(
        self, etcd: EtcdClient, election: Election, term: int, stop: asyncio.Event
    ) -> None:
        self.recommender = Recommender()  # history comes from targets/, not a past term
        self.actuator.new_term()  # another leader may have acted meanwhile
        seeded = False
        while _leads(election, term) and not stop.is_set():
            try:
                targets = await read_targets(etcd, self.layout)
                if not seeded:
                    # As the HPA seeds with (now, current replicas): the count in force
                    # holds for a whole scale-down window from the takeover, however long
                    # ago the previous leader decided it.
                    now = self._wall()
                    for service, target in targets.items():
                        self.recommender.remember(service, now, target.replicas)
                    seeded = True
                await self.evaluate(etcd, election, term, targets)
                self._outage.recovered()
            except NotLeader as exc:
                log.warning("no longer leader: %s", exc)
                return
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
            waiter = asyncio.ensure_future(election.leader_lost.wait())
            await _until(asyncio.sleep(self.config.interval), stop, waiter)
            waiter.cancel()

    async def evaluate(
        self, etcd: EtcdClient, election: Election, term: int, targets: Mapping[str, Target]
    ) -> dict[str, Target]:
        """One period: decide every service with a policy, write what changed, act.

        Raises NotLeader, acting no further, once ``term`` is over.
        """
        layout = self.layout
        policy_kvs, _ = await etcd.get_prefix(layout.policies)
        policies: dict[str, Policy] = dict(
            _parse_each(
                policy_kvs, lambda k: layout.parse_last(k, layout.policies), Policy.from_json
            )
        )
        load_kvs, _ = await etcd.get_prefix(layout.loads)
        loads: dict[str, dict[str, LoadReport]] = {}
        for (service, instance_id), report in _parse_each(
            load_kvs, layout.parse_load, LoadReport.from_json
        ):
            loads.setdefault(service, {})[instance_id] = report
        topology = await read_topology(etcd, layout)
        now = self._wall()

        decisions: dict[str, tuple[int, Decision]] = {}
        for service, policy in policies.items():
            serving = [r.id for r in topology.instances(service) if r.serving]
            current = self._current(service, targets.get(service), len(serving))
            reports = {i: loads.get(service, {}).get(i) for i in serving}
            decision = self.recommender.evaluate(
                service,
                policy,
                current=current,
                reports=reports,
                now=now,
                interval_s=self.config.interval,
                stale_after_s=self.config.stale_after,
            )
            decisions[service] = (current, decision)

        allocation = allocate(
            [
                BudgetRequest(s, c, d.replicas, policies[s].min_replicas)
                for s, (c, d) in decisions.items()
            ],
            self.config.max_total_replicas,
        )
        written: dict[str, Target] = {}
        for service, (current, decision) in sorted(decisions.items()):
            replicas = allocation.granted[service]
            reason = decision.reason
            if service in allocation.capped:
                reason += "; " + allocation.describe(service, decision.replicas)
            old = targets.get(service)
            if old is None or old.replicas != replicas:
                target = Target(
                    replicas=replicas,
                    previous=old.replicas if old is not None else current,
                    reason=reason,
                    metric=decision.metric if decision.metric is not None else 0.0,
                    decided_at=round(now, 3),
                    term=term,
                    leader=self.config.scaler_id,
                )
                await election.put_fenced(layout.target(service), target.to_json(), term=term)
                log.info("%s: target %d (%s)", service, replicas, reason)
                written[service] = target
            # The target write is fenced in etcd; the actuator cannot be, so look again
            # right before each call: a leader that stalled (in an earlier apply, say)
            # must not re-apply an old count after a new leader scaled.
            if not _leads(election, term):
                raise NotLeader(f"term {term} is over: not applying {service} {replicas}")
            try:
                await self.actuator.apply(service, replicas)
            except (MeshError, OSError) as exc:
                # One service's actuator failing must not stop the others' scaling.
                log.warning("%s: actuator could not reach %d replicas: %s", service, replicas, exc)
        return written

    def _current(self, service: str, target: Target | None, serving: int) -> int:
        """The count in force: what the actuator runs, else the last target, else what serves."""
        running = self.actuator.replicas(service)
        if running is not None:
            return running
        if target is not None:
            return target.replicas
        return serving


def _leads(election: Election, term: int) -> bool:
    """Still leading, and in the same term (not deposed and elected again meanwhile)."""
    return election.is_leader and election.term == term


async def _until(work: Any, *others: Any) -> Any:
    """Await ``work`` unless one of ``others`` (events or futures) finishes first; None then."""
    task = asyncio.ensure_future(work)
    waiters = [
        asyncio.ensure_future(o.wait()) if isinstance(o, asyncio.Event) else o for o in others
    ]
    done, _ = await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        if waiter not in done and isinstance(waiter, asyncio.Task):
            waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
