"""The one seam between ringmesh and etcd: the only module that imports aetcd.

aetcd 1.0.0 lacks a few things a mesh needs, added here (FIELD-NOTES.md):
a channel over several endpoints, TLS, per-call timeouts, reconnect after an
expired auth token, and errors translated into ringmesh's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions as aetcd_errors
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc

from registry.errors import EtcdError, EtcdUnavailable, RevisionCompacted
from registry.etcd_config import DEFAULT_ETCD, EtcdConfig
from registry.lifecycle import AsyncClosing

T = TypeVar("T")
__all__ = ["DEFAULT_ETCD", "EtcdClient", "EtcdConfig", "KeyValue", "WatchEvent"]

# Reconnect quickly after etcd comes back (gRPC's default backoff grows to 120 s),
# and notice a dead TCP connection under a silent watch.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.enable_retries": 0,
}


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix; ``value`` is None for a delete."""

    key: str
    value: bytes | None
    revision: int
    lease: int


class _AetcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with our channel: several endpoints, TLS, and channel options."""

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(
            username=config.user,
            password=config.password,
            timeout=config.timeout,
            options=_CHANNEL_OPTIONS,
            connect_wait_timeout=config.timeout,
        )
        self._ringmesh_config = config

    async def connect(self) -> None:
        # Mirrors aetcd 1.0.0 Client.connect, which always builds an insecure
        # channel to a single host:port.
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        config = self._ringmesh_config
        try:
            self._is_connecting = True
            target = config.grpc_target()
            options = list(self._options.items())
            if config.tls and len(config.endpoints) > 1:
                # The target "ipv4:a,b" is no host name: check every member's
                # certificate against the first endpoint's host instead (etcd
                # member certificates usually name every member).
                first_host = config.endpoints[0].rpartition(":")[0].strip("[]")
                options.append(("grpc.ssl_target_name_override", first_host))
            if config.tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(config.ca_file),
                    private_key=_read(config.key_file),
                    certificate_chain=_read(config.cert_file),
                )
                self.channel = grpc.aio.secure_channel(target, credentials, options=options)
            else:
                self.channel = grpc.aio.insecure_channel(target, options=options)
            if config.user is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                request = aetcd.rpc.AuthenticateRequest(name=config.user, password=config.password)
                try:
                    response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except aetcd.rpc.AioRpcError as exc:
                    await self.channel.close()
                    self._init_channel_attrs()
                    aetcd_errors._handle_exception(exc)
                self.metadata = (("token", response.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


_UNAVAILABLE = (
    aetcd_errors.ConnectionFailedError,
    aetcd_errors.ConnectionTimeoutError,
    aetcd_errors.WatchTimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
)


class EtcdClient(AsyncClosing):
    """ringmesh's view of etcd: typed values, ringmesh errors, bounded calls."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._client = _AetcdClient(config)
        self._closed = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()

    async def _call(self, op: Callable[[Any], Awaitable[T]], what: str) -> T:
        """Run one etcd request with a deadline; translate aetcd's errors."""
        for attempt in (1, 2):
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as the call completes.
                async with asyncio.timeout(self.config.timeout):
                    return await op(self._client)
            except aetcd_errors.UnauthenticatedError as exc:
                # aetcd never renews an expired token: reconnect (re-authenticate) once.
                if attempt == 1 and self.config.user is not None:
                    await self._client.close()
                    continue
                raise EtcdError(f"etcd {what}: unauthenticated: {exc}") from exc
            except _UNAVAILABLE as exc:
                raise EtcdUnavailable(
                    f"etcd {what}: unavailable ({exc or type(exc).__name__})"
                ) from exc
            except aetcd_errors.ClientError as exc:
                raise EtcdError(f"etcd {what}: {exc}") from exc
        raise AssertionError("unreachable")

    async def get(self, key: str) -> KeyValue | None:
        found = await self._call(lambda c: c.get(key.encode()), f"get {key}")
        return None if found is None else _kv(found)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        found = await self._call(lambda c: c.get_prefix(prefix.encode()), f"get {prefix}*")
        return [_kv(item) for item in found], found.header.revision

    async def put(self, key: str, value: bytes, *, lease: int | None) -> int:
        """Put ``key``; ``lease`` is explicit so no caller forgets it by accident."""
        result = await self._call(lambda c: c.put(key.encode(), value, lease=lease), f"put {key}")
        revision: int = result.header.revision
        return revision

    async def delete(self, key: str) -> bool:
        result = await self._call(lambda c: c.delete(key.encode()), f"delete {key}")
        return result is not None

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl), "lease grant")
        lease_id: int = lease.id
        return lease_id

    async def refresh_lease(self, lease_id: int) -> int:
        """Send one keep-alive; returns the new TTL, 0 if the lease is gone."""
        reply = await self._call(lambda c: c.refresh_lease(lease_id), "lease keep-alive")
        return 0 if reply is None else int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self._call(lambda c: c.revoke_lease(lease_id), "lease revoke")
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease, -1 if it does not exist."""
        info = await self._call(lambda c: c.get_lease_info(lease_id, keys=False), "lease ttl")
        return int(info.TTL)

    async def get_prefix_by_create(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Like get_prefix, oldest first: sorted by create revision (an election's queue)."""
        found = await self._call(
            lambda c: c.get_prefix(prefix.encode(), sort_order="ascend", sort_target="create"),
            f"get {prefix}* by create revision",
        )
        return [_kv(item) for item in found], found.header.revision

    async def create(self, key: str, value: bytes, *, lease: int | None) -> int | None:
        """Put ``key`` only if it does not exist (one transaction).

        Returns the new key's create revision, or None if the key already existed
        (nothing written). ``lease`` is explicit, as for put.
        """
        encoded = key.encode()

        def txn(c: Any) -> Awaitable[tuple[bool, list[Any]]]:
            ops = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[ops.create(encoded) == 0],
                success=[ops.put(encoded, value, lease=lease), ops.get(encoded)],
                failure=[],
            )

        created, responses = await self._call(txn, f"create {key}")
        if not created:
            return None
        # The get in the same transaction sees the put: its create revision is ours.
        (_value, kv), *_ = responses[1]
        revision: int = kv.create_revision
        return revision

    async def put_if_unchanged(
        self, key: str, value: bytes, *, lease: int | None, mod_revision: int
    ) -> bool:
        """Put ``key`` only if its mod revision is still ``mod_revision`` (compare-and-swap).

        ``mod_revision`` 0 means "only if the key does not exist" (etcd gives an
        absent key revision 0). Returns False, nothing written, when another write
        came first: read again, redo the change, try again.
        """
        if mod_revision < 0:
            raise ValueError(f"mod revision must be >= 0, got {mod_revision}")
        encoded = key.encode()

        def txn(c: Any) -> Awaitable[tuple[bool, list[Any]]]:
            ops = c.transactions
            unchanged = (
                ops.create(encoded) == 0 if mod_revision == 0 else ops.mod(encoded) == mod_revision
            )
            return c.transaction(  # type: ignore[no-any-return]
                compare=[unchanged],
                success=[ops.put(encoded, value, lease=lease)],
                failure=[],
            )

        swapped, _responses = await self._call(txn, f"put {key} if at revision {mod_revision}")
        return bool(swapped)

    async def put_fenced(
        self,
        key: str,
        value: bytes,
        *,
        lease: int | None,
        fence_key: str,
        fence_create_revision: int,
    ) -> bool:
        """Put ``key`` only while ``fence_key`` exists with that create revision.

        Returns False (nothing written) when the fence no longer holds: the key was
        deleted, or deleted and created again (a new create revision).
        """
        return await self._fenced(
            "put",
            key,
            lambda ops: ops.put(key.encode(), value, lease=lease),
            fence_key=fence_key,
            fence_create_revision=fence_create_revision,
        )

    async def delete_fenced(self, key: str, *, fence_key: str, fence_create_revision: int) -> bool:
        """Delete ``key`` only while the fence holds (see put_fenced); False if it does not.

        True means the fence held, whether or not ``key`` existed.
        """
        return await self._fenced(
            "delete",
            key,
            lambda ops: ops.delete(key.encode()),
            fence_key=fence_key,
            fence_create_revision=fence_create_revision,
        )

    async def _fenced(
        self,
        what: str,
        key: str,
        op: Callable[[Any], Any],
        *,
        fence_key: str,
        fence_create_revision: int,
    ) -> bool:
        if fence_create_revision <= 0:
            # create_revision == 0 would hold for an absent fence key: never a fence.
            raise ValueError(f"fence create revision must be positive, got {fence_create_revision}")
        fence = fence_key.encode()

        def txn(c: Any) -> Awaitable[tuple[bool, list[Any]]]:
            ops = c.transactions
            return c.transaction(  # type: ignore[no-any-return]
                compare=[ops.create(fence) == fence_create_revision],
                success=[op(ops)],
                failure=[],
            )

        held, _responses = await self._call(
            txn, f"{what} {key} fenced on {fence_key}@{fence_create_revision}"
        )
        return bool(held)

    def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under ``prefix`` from ``start_revision`` on, until the stream breaks.

        Raises EtcdUnavailable when the connection breaks (the caller re-watches
        from the last revision + 1) and RevisionCompacted when history is gone.
        """
        key = prefix.encode()
        return self._watch(
            key, aetcd.utils.prefix_range_end(key), start_revision, what=f"{prefix}*"
        )

    def watch_key(self, key: str, *, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Events on exactly ``key`` from ``start_revision`` on; errors as watch_prefix.

        An async generator: close it (``contextlib.aclosing``) to cancel the watch
        at once when leaving early.
        """
        return self._watch(key.encode(), None, start_revision, what=key)

    async def _watch(
        self, key: bytes, range_end: bytes | None, start_revision: int, *, what: str
    ) -> AsyncGenerator[WatchEvent, None]:
        try:
            watch = await self._call(
                lambda c: c.watch(key, range_end=range_end, start_revision=start_revision),
                f"watch {what}",
            )
        except EtcdError as exc:
            cause = exc.__cause__
            if isinstance(cause, aetcd_errors.RevisionCompactedError):
                raise RevisionCompacted(cause.compacted_revision) from cause
            # A stream that breaks while the watch is being created surfaces
            # as a generic error; it is a broken connection all the same.
            raise EtcdUnavailable(f"etcd watch {what}: {exc}") from exc
        try:
            async for event in watch:
                kv = event.kv
                value = kv.value if event.kind == "PUT" else None
                yield WatchEvent(kv.key.decode(errors="replace"), value, kv.mod_revision, kv.lease)
        except aetcd_errors.RevisionCompactedError as exc:
            raise RevisionCompacted(exc.compacted_revision) from exc
        except _UNAVAILABLE as exc:
            raise EtcdUnavailable(f"etcd watch {what}: {exc or type(exc).__name__}") from exc
        except aetcd_errors.ClientError as exc:
            raise EtcdUnavailable(f"etcd watch {what}: {exc}") from exc
        finally:
            await _quietly(watch.cancel())
        # The watcher stream closed without an error: treat it as a broken connection.
        raise EtcdUnavailable(f"etcd watch {what}: stream ended")


async def _quietly(awaitable: Awaitable[Any]) -> None:
    # Best-effort cleanup of a stream that is already broken.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(awaitable, 1.0)


def _kv(item: Any) -> KeyValue:
    return KeyValue(
        key=item.key.decode(errors="replace"),
        value=item.value,
        create_revision=item.create_revision,
        mod_revision=item.mod_revision,
        lease=item.lease,
    )
