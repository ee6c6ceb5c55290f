"""Leader election on etcd: the recipe the scaler uses (ARCHITECTURE.md, "Scaler").

Each candidate holds a lease of its own and creates, only if absent,
``<prefix>/election/<name>/<lease-hex>`` with its id as the value. The key with the
lowest create revision leads. Every other candidate watches only the key just ahead
of it (the greatest create revision below its own) and looks again when that key is
deleted, so a leader's exit wakes one candidate, not all of them. The leader watches
its own key.

Term: the create revision of the leader's key. etcd revisions only grow, and a key
created after the leader's can never be ahead of it, so every new leader's term is
greater than any earlier leader's; a term names one continuous leadership.

Fencing: a leader's writes are transactions that hold only while its key still exists
with that create revision. That is the same as still leading (no key can appear ahead
of it), so a paused old leader's write fails once another has taken over, whatever
its own clock says (NotLeader).

The lease is kept here rather than by LeaseKeeper: the key's name depends on the
lease, so a new lease is a new candidacy (LeaseKeeper would put the old key again
under the new lease), and a leader must give up *before* its lease could expire.
Leadership therefore lasts until ``TTL - margin`` after the last successful refresh
was *sent* (etcd restarted the TTL no earlier than that). When it runs out, the lease
is lost, or the key is deleted, the candidacy is over: ``leader_lost`` is set, the
lease is revoked (now, or once etcd answers again) and a new candidacy starts. Once
the budget has run out it is never renewed, also by a refresh answered just after: a
leadership that stopped by the clock never resumes (``tenure`` is final).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

from registry.candidacy import Candidate, LeaseBudget, Standing, election_prefix, queue, standing
from registry.errors import EtcdError, EtcdUnavailable, MeshError, NotLeader, RevisionCompacted
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_instance_id
from registry.lease import Clock, Sleep
from registry.lifecycle import AsyncClosing
from registry.outage import OutageLog

log = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "Election",
    "LeaseBudget",
    "Standing",
    "Tenure",
    "election_prefix",
    "queue",
    "read_leader",
    "standing",
]


async def read_leader(
    client: EtcdClient, layout: KeyLayout, *, name: str = "scaler"
) -> Candidate | None:
    """Who leads the election ``name`` now, as etcd sees it (for `ringmesh topology`)."""
    kvs, _revision = await client.get_prefix_by_create(election_prefix(layout, name))
    candidates = queue(kvs)
    return candidates[0] if candidates else None


# --- the election ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tenure:
    """One leadership by the election's clock: ``is_leader`` was true, for ``term``, at
    no time outside [since, until] (``until`` is None while it lasts)."""

    term: int
    since: float
    until: float | None = None


_TENURES_KEPT = 8


class _CandidacyOver(Exception):
    """Internal: this lease and key are done with; start a new candidacy."""


class Election(AsyncClosing):
    """One candidate in the election ``name``; an async context manager.

    ``campaign()`` returns (the term) once leading; a background task keeps the lease,
    follows the queue and, after a loss, campaigns again until ``resign()``/``aclose()``.
    ``leader_lost`` is set when a leadership ends and cleared when a new one starts.
    """

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        *,
        candidate_id: str,
        name: str = "scaler",
        ttl: int = 10,
        margin: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        retry_interval: float = 0.5,
    ) -> None:
        self._client = client
        self.name = name
        self.prefix = election_prefix(layout, name)
        self._layout = layout
        self.candidate_id = validate_instance_id(candidate_id)
        self.ttl = ttl
        self.margin = ttl / 4 if margin is None else margin
        self._budget = LeaseBudget(ttl, self.margin)  # validates ttl and margin
        self._clock = clock
        self._sleep = sleep
        self._retry_interval = retry_interval
        self.leader_lost = asyncio.Event()
        self._elected = asyncio.Event()
        self._candidacy: Candidate | None = None  # our key while it exists
        self._leadership: Candidate | None = None  # our key while it leads
        # The latest leaderships by term, oldest first (a few: what the owner may still ask).
        self._tenures: dict[int, Tenure] = {}
        self._abandoned: set[int] = set()  # leases to revoke once etcd answers
        self._task: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[None]] = set()  # the current candidacy's tasks
        self._stopping = asyncio.Event()  # set by resign() for the running task
        self._outage = OutageLog(
            log,
            down=lambda exc: f"election {self.prefix}: etcd unreachable: {exc}",
            up=lambda: f"election {self.prefix}: etcd reachable again",
        )
        self._closed = False

    # --- what the leader's code reads --------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while our key leads and the lease is surely alive (by the injected clock)."""
        return self._leadership is not None and self._budget.valid(self._clock())

    @property
    def term(self) -> int | None:
        """The current term (our key's create revision) while we lead, else None."""
        leadership = self._leadership
        return leadership.term if leadership is not None and self.is_leader else None

    @property
    def leading_until(self) -> float | None:
        """Clock time at which we stop leading unless the lease is refreshed; None if not leading."""
        return self._budget.valid_until if self.is_leader else None

    @property
    def tenure(self) -> Tenure | None:
        """The latest leadership (maybe the current one), ``until`` set once it is over."""
        latest = next(reversed(self._tenures), None)
        return None if latest is None else self.tenure_of(latest)

    def tenure_of(self, term: int) -> Tenure | None:
        """Our leadership of ``term`` (one of the latest few), ``until`` set once it is over.

        By the time a leader's code sees its term is over, the election may already
        lead again in a new term: this is how it learns when the old one ended.
        """
        tenure = self._tenures.get(term)
        if tenure is not None and tenure.until is None and not self.is_leader:
            # Only the current leadership can be open. Over by the clock, not demoted
            # yet (_watch_budget is about to): the budget is never renewed once it ran
            # out, so its end is final.
            return dataclasses.replace(tenure, until=self._budget.valid_until)
        return tenure

    @property
    def key(self) -> str | None:
        """Our key under the election prefix, while we have one."""
        return None if self._candidacy is None else self._candidacy.key

    async def leader(self) -> str | None:
        """The id of whoever leads now (maybe us), None if nobody campaigns."""
        found = await read_leader(self._client, self._layout, name=self.name)
        return None if found is None else found.id

    # --- campaigning -------------------------------------------------------------------

    async def campaign(self) -> int:
        """Campaign (if not already) and return the term once this candidate leads."""
        if self._closed:
            raise MeshError("election is closed")
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled():
                self._task.result()  # a crashed campaign: raise what crashed it
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(
                self._run(self._stopping), name=f"election {self.prefix}"
            )
        task = self._task
        while True:
            term = self.term
            if term is not None:
                return term
            elected = asyncio.ensure_future(self._elected.wait())
            try:
                await asyncio.wait({elected, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                elected.cancel()
            if task.done():
                if not task.cancelled():
                    task.result()  # a crashed campaign: raise what crashed it
                raise NotLeader(f"{self.candidate_id} resigned while campaigning")

    async def resign(self) -> None:
        """Stop campaigning and delete our key (revoke the lease); campaign() starts over."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await self._stop(task)
        self._demote("resigned")
        await self._revoke_abandoned()

    async def _stop(self, task: asyncio.Task[None]) -> None:
        # Cancel again until it is done: on Python 3.11, asyncio.wait_for (under every
        # etcd call) drops a cancellation that arrives as its call completes, a TaskGroup
        # cancels its children only once, and prefers a child's error to its parent's
        # cancellation (so _stand() may return normally: _run() checks ``stop`` too).
        while not task.done():
            for each in (task, *self._children):
                each.cancel()
            await asyncio.wait({task}, timeout=0.1)

    async def aclose(self) -> None:
        """Resign and refuse to campaign again; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.resign()

    # --- fenced writes -----------------------------------------------------------------

    async def put_fenced(self, key: str, value: bytes, *, term: int | None = None) -> None:
        """Write ``key`` (no lease: it outlives the term) only while we lead.

        ``term``, if given, must still be the current term. Raises NotLeader, having
        written nothing, if we do not lead or our key is gone in etcd; EtcdUnavailable
        if etcd did not answer (the write may or may not have happened).
        """
        leadership = self._fence(term, f"put {key}")
        held = await self._client.put_fenced(
            key,
            value,
            lease=None,
            fence_key=leadership.key,
            fence_create_revision=leadership.term,
        )
        if not held:
            raise self._deposed(leadership, f"put {key}")

    async def delete_fenced(self, key: str, *, term: int | None = None) -> None:
        """Delete ``key`` only while we lead; errors as put_fenced."""
        leadership = self._fence(term, f"delete {key}")
        held = await self._client.delete_fenced(
            key, fence_key=leadership.key, fence_create_revision=leadership.term
        )
        if not held:
            raise self._deposed(leadership, f"delete {key}")

    def _fence(self, term: int | None, what: str) -> Candidate:
        leadership = self._leadership
        if leadership is None or not self.is_leader:
            raise NotLeader(f"{self.candidate_id} does not lead {self.prefix}: refusing to {what}")
        if term is not None and term != leadership.term:
            raise NotLeader(f"term {term} is over (now {leadership.term}): refusing to {what}")
        return leadership

    def _deposed(self, leadership: Candidate, what: str) -> NotLeader:
        """A fenced write was refused: our key is gone, so this leadership is over."""
        if self._leadership == leadership:
            self._demote(f"fenced {what} refused: key {leadership.key} is gone")
        return NotLeader(
            f"{self.candidate_id} no longer leads {self.prefix} (term {leadership.term}): "
            f"{what} refused"
        )

    # --- the background campaign -------------------------------------------------------

    async def _run(self, stop: asyncio.Event) -> None:
        while True:
            if stop.is_set():
                return  # resign() cancelled us, but the cancellation was swallowed
            await self._revoke_abandoned()
            try:
                lease = await self._grant()
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
                await self._sleep(self._retry_interval)
                continue
            try:
                reason = await self._stand(lease)
                log.warning("candidacy %x in %s over: %s", lease, self.prefix, reason)
            finally:
                self._demote("resigned" if stop.is_set() else f"candidacy {lease:x} over")
                self._candidacy = None
                self._abandoned.add(lease)

    async def _grant(self) -> int:
        sent = self._clock()
        lease = await self._client.grant_lease(self.ttl)
        self._outage.recovered()
        self._budget = LeaseBudget(self.ttl, self.margin)
        self._budget.renewed(sent, self.ttl)
        return lease

    async def _stand(self, lease: int) -> str:
        """Run one candidacy until it is over; return why."""
        reason = "?"
        try:
            async with asyncio.TaskGroup() as tasks:
                for loop in (self._keep_lease(lease), self._watch_budget(), self._contend(lease)):
                    child = tasks.create_task(loop)
                    self._children.add(child)
                    child.add_done_callback(self._children.discard)
        except* _CandidacyOver as over:
            reason = str(over.exceptions[0])
        return reason

    async def _keep_lease(self, lease: int) -> None:
        failing = False
        while True:
            interval = self._budget.refresh_interval
            await self._sleep(min(interval, self._retry_interval) if failing else interval)
            sent = self._clock()
            try:
                ttl_left = await self._client.refresh_lease(lease)
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
                failing = True
                continue
            if ttl_left <= 0:
                raise _CandidacyOver(f"lease {lease:x} expired or was revoked")
            if not self._budget.valid(self._clock()):
                # Answered after the budget ran out (before _watch_budget woke up to say
                # so): a leadership that ended by the clock must not come back to life.
                raise _CandidacyOver(f"lease {lease:x} refreshed only after the budget ran out")
            self._budget.renewed(sent, ttl_left)
            self._outage.recovered()
            failing = False

    async def _watch_budget(self) -> None:
        """End the candidacy when the lease can no longer be trusted alive."""
        while True:
            left = self._budget.left(self._clock())
            if left <= 0:
                raise _CandidacyOver(f"no successful lease refresh for {self._budget.span:g} s")
            await self._sleep(left)

    async def _contend(self, lease: int) -> None:
        key = f"{self.prefix}{lease:x}"
        term = await self._enter(key, lease)
        self._candidacy = Candidate(self.candidate_id, key, term, lease)
        waiting_on: str | None = None
        while True:
            try:
                kvs, listed_at = await self._client.get_prefix_by_create(self.prefix)
                self._outage.recovered()
                candidates = queue(kvs)
                if any(c.lease in self._abandoned for c in candidates):
                    # Our own earlier key (etcd was down when we let it go): never wait on it.
                    if not await self._revoke_abandoned():
                        await self._sleep(self._retry_interval)
                    continue
                place = standing(candidates, key, term)
                if place is None:
                    raise _CandidacyOver(f"our key {key} is gone")
                if place.ahead is None:
                    self._promote(self._candidacy)
                    watched = key
                else:
                    watched = place.ahead.key
                    if watched != waiting_on:
                        log.info(
                            "%s waits in %s behind %s (term %d)",
                            self.candidate_id,
                            self.prefix,
                            place.ahead.id,
                            place.ahead.term,
                        )
                waiting_on = watched
                await self._wait_deleted(watched, listed_at + 1)
            except RevisionCompacted:
                continue  # list again
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
                await self._sleep(self._retry_interval)

    async def _enter(self, key: str, lease: int) -> int:
        """Create our key; its create revision. Idempotent: an earlier try may have landed."""
        while True:
            try:
                created = await self._client.create(key, self.candidate_id.encode(), lease=lease)
                if created is not None:
                    return created
                existing = await self._client.get(key)
            except EtcdUnavailable as exc:
                self._outage.failed(exc)
                await self._sleep(self._retry_interval)
                continue
            except EtcdError as exc:
                raise _CandidacyOver(f"could not create {key}: {exc}") from exc
            if existing is None or existing.lease != lease:
                raise _CandidacyOver(f"our key {key} is gone")
            return existing.create_revision

    async def _wait_deleted(self, key: str, start_revision: int) -> None:
        async with contextlib.aclosing(
            self._client.watch_key(key, start_revision=start_revision)
        ) as events:
            async for event in events:
                if event.value is None:
                    return

    def _promote(self, candidacy: Candidate) -> None:
        if self._leadership == candidacy:
            return
        self._leadership = candidacy
        self._tenures[candidacy.term] = Tenure(candidacy.term, self._clock())
        while len(self._tenures) > _TENURES_KEPT:
            del self._tenures[next(iter(self._tenures))]
        self.leader_lost.clear()
        self._elected.set()
        log.info("%s leads %s (term %d)", self.candidate_id, self.prefix, candidacy.term)

    def _demote(self, why: str) -> None:
        leadership, self._leadership = self._leadership, None
        if leadership is None:
            return
        tenure = self._tenures.get(leadership.term)
        if tenure is not None and tenure.until is None:
            ended = min(self._clock(), self._budget.valid_until)
            self._tenures[leadership.term] = dataclasses.replace(tenure, until=ended)
        self._elected.clear()
        self.leader_lost.set()
        # Resigning is the normal way out (shutdown); anything else is worth a warning.
        log.log(
            logging.INFO if why == "resigned" else logging.WARNING,
            "%s no longer leads %s (term %d): %s",
            self.candidate_id,
            self.prefix,
            leadership.term,
            why,
        )

    async def _revoke_abandoned(self) -> bool:
        """Revoke leases of past candidacies so their keys stop blocking the queue.

        True if none is left to revoke.
        """
        for lease in sorted(self._abandoned):
            try:
                await self._client.revoke_lease(lease)
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
                continue
            self._abandoned.discard(lease)
        return not self._abandoned
