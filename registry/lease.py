"""LeaseKeeper: keeps an instance's records alive under one etcd lease.

aetcd has no keep-alive loop, so this is it: refresh every TTL/3. A refresh
answering TTL <= 0, or no successful refresh for a whole TTL, means the lease
is lost: grant a new one, put every record again, tell the owner. A record is
never put without a lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from registry.errors import EtcdError, EtcdUnavailable, MeshError
from registry.etcd import EtcdClient
from registry.outage import OutageLog

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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
        retry_interval: float = 0.5,
    ) -> None:
        if ttl < 2:
            raise MeshError(f"lease TTL must be at least 2 s, got {ttl}")
        self._client = client
        self.ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self._on_new_lease = on_new_lease
        self._retry_interval = retry_interval
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
            await self._sleep(self.ttl / 3 if not self._outage.down else self._retry_interval)
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
            await self._sleep(self._retry_interval)
            return
        if self._revoked:  # revoke() ran while the records were being put
            return
        self.grants += 1
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
        # etcd restarts the TTL when it handles the refresh, some time after we sent
        # it: counting from the send time never overestimates the lease.
        sent_at = self._clock()
        try:
            ttl_left = await self._client.refresh_lease(self._lease_id)
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
