"""LeaseKeeper: keeps an instance's records alive under one etcd lease.

aetcd has no keep-alive loop, so this is it: refresh every TTL/3. A refresh
answering TTL <= 0, or no successful refresh for a whole TTL, means the lease
is lost: grant a new one, put every record again, tell the owner. A record is
never put without a lease.

While etcd does not answer, calls are retried, forever, after an exponential
backoff with full jitter (``Backoff``): when etcd comes back after a long
outage, a fleet of sidecars whose leases all expired spreads its grants over
seconds instead of arriving together. A refresh of a lease that may still be
alive is retried within half the time the lease has left (down to
``MIN_RETRY_LIMIT``), so the backoff never costs a registration that etcd still
holds: an outage that ends before the lease would is followed by a refresh in
time to keep it.

A member that hangs (stopped, not dead) holds every call sent to it until the
call timeout (3 s), and the channel keeps choosing it, one call in N, until its
keep-alive fails (up to 8 s): refreshes one after the other could all land on it
before a 10 s lease ends. So a refresh still unanswered after half the time the
lease has left is hedged: another one goes out (round robin: most likely to
another member) and the first answer counts (``_refresh_hedged``). That costs an
extra request only when a lease is at risk, and never gives up on a slow answer
that could still come in time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from registry.errors import EtcdError, EtcdUnavailable, MeshError
from registry.etcd import EtcdClient
from registry.outage import OutageLog

log = logging.getLogger(__name__)

# The least _retry_delay() ever lowers the backoff's ceiling to, near the end of a lease,
# and the least time a refresh is given before it is hedged.
MIN_RETRY_LIMIT = 0.05
# At most this many refreshes in flight at once (one per member of a 3-member cluster).
MAX_REFRESHES_IN_FLIGHT = 3

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Backoff:
    """Exponential backoff with full jitter; pure (the random source is injected).

    The n-th retry in a row (n = 0, 1, ...) waits ``uniform(0, min(cap, base * 2**n))``,
    the "full jitter" of AWS's "Exponential Backoff And Jitter": clients that failed
    together do not retry together. ``reset()`` after a success; it never gives up.
    ``random_source`` returns a float in [0, 1], as ``random.random`` does (a test may
    pass ``lambda: 1.0`` for the longest delays).
    """

    def __init__(
        self,
        *,
        base: float = 0.25,
        cap: float = 5.0,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < base <= cap:
            raise MeshError(f"backoff needs 0 < base <= cap, got base {base}, cap {cap}")
        self.base = base
        self.cap = cap
        self._random = random_source
        self.failures = 0  # retries in a row since the last reset

    def ceiling(self, limit: float | None = None) -> float:
        """The longest the next delay can be (``limit``, if given, lowers it)."""
        # 2**n overflows a float past n ~ 1023: stop doubling once past the cap.
        doubled = self.base * 2.0 ** min(self.failures, 64)
        ceiling = min(self.cap, doubled)
        return ceiling if limit is None else max(0.0, min(ceiling, limit))

    def next(self, limit: float | None = None) -> float:
        """The delay before the next retry, at most ``limit`` if given; counts one failure."""
        fraction = self._random()
        if not 0.0 <= fraction <= 1.0:
            raise MeshError(f"backoff: random source gave {fraction}, not a float in [0, 1]")
        delay = self.ceiling(limit) * fraction
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def _retrieve(call: asyncio.Future[int]) -> None:
    """Take the outcome of a refresh nobody waits for any more (no "never retrieved")."""
    if not call.cancelled():
        call.exception()


class LeaseKeeper:
    """Owns one lease and the records under it; run() until cancelled, then revoke()."""

    def __init__(
        self,
        client: EtcdClient,
        *,
        ttl: int,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_new_lease: Callable[[int], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if ttl < 2:
            raise MeshError(f"lease TTL must be at least 2 s, got {ttl}")
        self._client = client
        self.ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self._on_new_lease = on_new_lease
        self._backoff = backoff if backoff is not None else Backoff()
        self._records: dict[str, bytes] = {}
        # One put at a time, each sending the record's latest value: a re-grant's
        # put of every record must not overwrite a newer put (say, `draining`).
        self._put_lock = asyncio.Lock()
        self._lease_id: int | None = None
        self._last_ok = 0.0  # when the last successful grant or refresh was *sent*
        self._synced = False
        self._outage = OutageLog(
            log, down=lambda exc: f"etcd unreachable, keeping the last registration: {exc}"
        )
        self._revoked = False
        self.granted = asyncio.Event()  # set once the records are in etcd under a lease
        self.grants = 0

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    async def put(self, key: str, value: bytes) -> None:
        """Keep ``key`` = ``value`` under the lease (now if etcd answers, else on reconnect)."""
        self._records[key] = value
        async with self._put_lock:
            lease_id = self._lease_id
            if lease_id is None or self._revoked:
                return  # the next grant puts every record
            try:
                await self._client.put(key, self._records[key], lease=lease_id)
            except (EtcdUnavailable, EtcdError) as exc:
                self._synced = False  # the refresh loop puts every record again
                self._outage.failed(exc)

    async def run(self) -> None:
        while not self._revoked:
            if self._lease_id is None:
                await self._grant()
                continue
            await self._sleep(self._retry_delay() if self._outage.down else self.ttl / 3)
            if self._revoked:
                return
            await self._refresh()

    async def _grant(self) -> None:
        try:
            sent_at = self._clock()
            lease_id = await self._client.grant_lease(self.ttl)
            if self._revoked:  # revoke() ran while the grant was in flight
                await self._client.revoke_lease(lease_id)
                return
            self._lease_id = lease_id
            self._last_ok = sent_at
            await self._put_all()
        except (EtcdUnavailable, EtcdError) as exc:
            self._lease_id = None
            self._outage.failed(exc)
            await self._sleep(self._backoff.next())
            return
        if self._revoked:  # revoke() ran while the records were being put
            return
        self.grants += 1
        self._backoff.reset()
        self._outage.recovered()
        log.info(
            "lease %x granted (ttl %ss), %d record(s) registered",
            lease_id,
            self.ttl,
            len(self._records),
        )
        self.granted.set()
        if self._on_new_lease is not None:
            await self._on_new_lease(lease_id)

    async def _refresh(self) -> None:
        assert self._lease_id is not None
        try:
            # etcd restarts the TTL when it handles the refresh, some time after we sent
            # it: counting from the send time never overestimates the lease.
            ttl_left, sent_at = await self._refresh_hedged(self._lease_id)
        except (EtcdUnavailable, EtcdError) as exc:
            self._outage.failed(exc)
            if self._clock() - self._last_ok >= self.ttl:
                self._lose(f"no successful refresh for {self.ttl} s")
            return
        if ttl_left <= 0:
            self._lose("etcd says it expired or was revoked")
            return
        self._last_ok = sent_at
        self._outage.recovered()
        if not self._synced:
            try:
                await self._put_all()
            except (EtcdUnavailable, EtcdError) as exc:
                self._outage.failed(exc)
                return
        self._backoff.reset()

    async def _refresh_hedged(self, lease_id: int) -> tuple[int, float]:
        """refresh_lease(); (the TTL, when the refresh that answered was sent).

        While none has answered, another is sent each time half the time the lease has
        left has passed (by the event loop's clock), up to MAX_REFRESHES_IN_FLIGHT.
        The first answer wins and the others are cancelled; an error counts only once
        no other refresh is in flight (then it is raised), and so does silence once the
        lease has run out by our count.
        """
        in_flight: dict[asyncio.Future[int], float] = {}  # refresh -> when it was sent
        hedge = True
        try:
            while True:
                if hedge and len(in_flight) < MAX_REFRESHES_IN_FLIGHT:
                    sent = self._clock()
                    in_flight[asyncio.ensure_future(self._client.refresh_lease(lease_id))] = sent
                left = self._last_ok + self.ttl - self._clock()
                done, _ = await asyncio.wait(
                    in_flight,
                    timeout=max(MIN_RETRY_LIMIT, left / 2),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for call in done:
                    sent = in_flight.pop(call)
                    error = call.exception()
                    if error is None:
                        return call.result(), sent
                    if not in_flight:
                        raise error
                if not done and self._last_ok + self.ttl <= self._clock():
                    # Whatever may still come, the lease is lost by our count.
                    raise EtcdUnavailable(
                        f"etcd lease keep-alive: no answer before the {self.ttl} s lease ran out"
                    )
                # None answered in time: hedge. One failed with others still out: wait
                # for those before sending another.
                hedge = not done
        finally:
            for call in in_flight:
                call.cancel()
                call.add_done_callback(_retrieve)

    def _retry_delay(self) -> float:
        """How long to wait before retrying a refresh (or a put) that failed.

        The backoff's, but never more than half the time the lease surely has left
        (at least MIN_RETRY_LIMIT): wherever the outage ends before the lease would, a
        refresh follows in time to keep it. The leases of a fleet end at times spread
        over TTL/3 (their refresh phases), so this does not bunch their retries up.
        """
        left = self._last_ok + self.ttl - self._clock()
        return self._backoff.next(limit=max(MIN_RETRY_LIMIT, left / 2))

    async def _put_all(self) -> None:
        async with self._put_lock:
            lease_id = self._lease_id
            if lease_id is None or self._revoked:
                return  # lost or revoked while waiting for a put in flight
            self._synced = False
            for key in list(self._records):
                if self._revoked or self._lease_id != lease_id:
                    return  # never put a record under a lease we no longer hold
                # The latest value, read now: put() may have changed it meanwhile.
                await self._client.put(key, self._records[key], lease=lease_id)
            self._synced = True

    def _lose(self, why: str) -> None:
        log.warning("lease %x lost (%s): granting a new one", self._lease_id or 0, why)
        self._lease_id = None
        self.granted.clear()

    async def revoke(self) -> None:
        """Stop keeping the lease and revoke it, deleting its records at once; idempotent."""
        self._revoked = True
        lease_id, self._lease_id = self._lease_id, None
        self.granted.clear()
        if lease_id is None:
            return
        try:
            await self._client.revoke_lease(lease_id)
        except (EtcdUnavailable, EtcdError) as exc:
            log.warning("could not revoke lease %x (its records expire with it): %s", lease_id, exc)
