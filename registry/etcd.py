"""The one seam between ringmesh and etcd: the only module that imports aetcd.

aetcd 1.0.0 lacks a few things a mesh needs, added here (FIELD-NOTES.md):
a channel over several endpoints, TLS, per-call timeouts, a new auth token
when the old one expires, watches that report a refusal instead of hanging,
etcd's user and role administration, and errors translated into ringmesh's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

from registry.errors import EtcdError, EtcdUnavailable, PermissionDenied, RevisionCompacted
from registry.etcd_config import DEFAULT_ETCD, EtcdConfig
from registry.lifecycle import AsyncClosing

log = logging.getLogger(__name__)
T = TypeVar("T")
__all__ = ["DEFAULT_ETCD", "EtcdClient", "EtcdConfig", "KeyValue", "Permission", "WatchEvent"]

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
    # Over several endpoints, spread calls over every member (gRPC's default,
    # pick_first, sends them all to one): a call that times out on a member
    # that hangs is retried by its caller on the next one, long before the
    # keep-alive gives up on that member's connection.
    "grpc.lb_policy_name": "round_robin",
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


PERMISSION_KINDS = ("read", "write", "readwrite")  # etcd's authpb.Permission.Type, in order


@dataclass(frozen=True, order=True)
class Permission:
    """One grant of an etcd role: ``kind`` on the keys ``[key, range_end)``."""

    key: str
    range_end: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in PERMISSION_KINDS:
            raise ValueError(
                f"permission kind must be one of {PERMISSION_KINDS}, got {self.kind!r}"
            )

    def __str__(self) -> str:
        if not self.range_end:  # one key
            return f"{self.kind} {self.key}"
        return f"{self.kind} [{self.key}, {self.range_end})"


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
            self.auth_stub = aetcd.rpc.AuthStub(self.channel)
            if config.user is not None:
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

    async def authenticate_again(self) -> None:
        """A new token on the same channel: calls in flight and open watches carry on.

        aetcd never renews its token; closing and reconnecting would break every watch.
        """
        await self.connect()
        config = self._ringmesh_config
        if config.user is None:
            return
        request = aetcd.rpc.AuthenticateRequest(name=config.user, password=config.password)
        try:
            response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        except aetcd.rpc.AioRpcError as exc:
            aetcd_errors._handle_exception(exc)
        self.metadata = (("token", response.token),)

    async def open_watch(
        self,
        key: bytes,
        range_end: bytes | None,
        start_revision: int,
        callback: Callable[[Any], Awaitable[None]],
    ) -> _Watcher:
        """One watch on a stream of its own, which carries the token current now.

        etcd checks a watch's permission when the watch is created, against the token
        its stream was opened with: watches sharing one stream (aetcd's way) would all
        be refused once that token expired, while a stream per watch lasts as long as
        its watch, whatever becomes of the token.
        """
        await self.connect()
        watcher = _Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        try:
            await watcher.add_callback(
                key, callback, range_end=range_end, start_revision=start_revision
            )
        except BaseException as exc:
            await _quietly(watcher.shutdown())
            if isinstance(exc, aetcd.rpc.AioRpcError):
                aetcd_errors._handle_exception(exc)
            raise
        return watcher

    async def auth_call(self, method: str, request: Any) -> Any:
        """One call of etcd's Auth service (aetcd 1.0.0 wraps only Authenticate)."""
        await self.connect()
        try:
            return await getattr(self.auth_stub, method)(
                request, timeout=self._timeout, metadata=self.metadata
            )
        except aetcd.rpc.AioRpcError as exc:
            aetcd_errors._handle_exception(exc)


# etcd's answers to a token it no longer takes; etcd's own client authenticates again.
_STALE_TOKEN = (
    "revision in header is old",  # a token from before the last user or role change
    "revision of auth store is old",
)


def _token_refused(exc: Exception) -> bool:
    """A request refused for its token, not for what it asked: a new token may pass.

    An expired token: unauthenticated. A JWT token from before the last change to users
    or roles (which would otherwise fail every call until a restart): "revision ... old".
    A watch on an expired token: "permission denied", as for a role that lacks the keys:
    a new token tells them apart.
    """
    if isinstance(exc, aetcd_errors.UnauthenticatedError):
        return True
    if isinstance(exc, _WatchRefused):
        return exc.permission_denied
    return any(text in str(exc) for text in _STALE_TOKEN)


class _WatchRefused(aetcd_errors.ClientError):  # type: ignore[misc]
    """etcd refused to create a watch, or cancelled one, for the reason given."""

    @property
    def permission_denied(self) -> bool:
        return "permission denied" in str(self)


class _Watcher(aetcd.watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, but a watch etcd refuses or cancels fails instead of going quiet.

    aetcd 1.0.0 ignores ``canceled``. etcd refuses a watch (permission denied, also when
    the stream's token has expired) with ``created`` and ``canceled`` both set and watch
    id 0: aetcd took that for a new watch 0, which never sees an event, in place of the
    stream's real watch 0, which then hung too.
    """

    async def _handle_response(self, response: Any) -> None:
        if not response.canceled or response.compact_revision != 0:
            await super()._handle_response(response)  # compaction: aetcd's own handling
            return
        error = _WatchRefused(response.cancel_reason or "watch cancelled by etcd")
        async with self._lock:
            if response.created:
                if self._new_callback is not None:
                    self._new_callback.error = error
                    self._new_callback_ready.notify_all()
                return
            callback = self._callbacks.pop(response.watch_id, None)
        if callback is not None:
            await self._process_callback(callback, error)


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
        authenticate_again = False
        for attempt in (1, 2):
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as the call completes.
                async with asyncio.timeout(self.config.timeout):
                    if authenticate_again:
                        await self._client.authenticate_again()
                    return await op(self._client)
            except _UNAVAILABLE as exc:
                raise EtcdUnavailable(
                    f"etcd {what}: unavailable ({exc or type(exc).__name__})"
                ) from exc
            except aetcd_errors.ClientError as exc:
                if attempt == 1 and self.config.user is not None and _token_refused(exc):
                    log.info("etcd %s: %s: authenticating again", what, exc)
                    authenticate_again = True
                    continue
                raise self._translate(what, exc) from exc
        raise AssertionError("unreachable")

    def _translate(self, what: str, exc: Exception) -> EtcdError:
        if isinstance(exc, aetcd_errors.UnauthenticatedError):
            return EtcdError(f"etcd {what}: unauthenticated: {exc}")
        cause = exc.__cause__
        denied = (
            isinstance(cause, grpc.aio.AioRpcError)
            and cause.code() == grpc.StatusCode.PERMISSION_DENIED
        ) or (isinstance(exc, _WatchRefused) and exc.permission_denied)
        if not denied:
            return EtcdError(f"etcd {what}: {exc}")
        who = f"user {self.config.user!r}" if self.config.user else "no etcd user"
        return PermissionDenied(
            f"etcd {what}: permission denied for {who} (see `ringmesh etcd-roles`)"
        )

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
        if reply is None:
            # The stream ended without an answer (a member going away closes it
            # cleanly): no news about the lease, not "expired" (that is TTL 0).
            raise EtcdUnavailable("etcd lease keep-alive: the stream ended without an answer")
        return int(reply.TTL)

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

    # --- users and roles (etcd's Auth service; the caller needs the root role) ------------

    async def auth_enabled(self) -> bool:
        reply = await self._call(
            lambda c: c.auth_call("AuthStatus", aetcd.rpc.AuthStatusRequest()), "auth status"
        )
        return bool(reply.enabled)

    async def role_permissions(self, role: str) -> frozenset[Permission] | None:
        """What ``role`` may do; None if there is no such role."""
        request = aetcd.rpc.AuthRoleGetRequest(role=role)
        try:
            reply = await self._call(lambda c: c.auth_call("RoleGet", request), f"role get {role}")
        except EtcdError as exc:
            if "not found" in str(exc):
                return None
            raise
        return frozenset(
            Permission(
                key=p.key.decode(errors="replace"),
                range_end=p.range_end.decode(errors="replace"),
                kind=PERMISSION_KINDS[p.permType],
            )
            for p in reply.perm
        )

    async def add_role(self, role: str) -> None:
        request = aetcd.rpc.AuthRoleAddRequest(name=role)
        await self._call(lambda c: c.auth_call("RoleAdd", request), f"role add {role}")

    async def grant_permission(self, role: str, permission: Permission) -> None:
        """Grant ``permission``; one already granted on the same keys changes its kind."""
        request = aetcd.rpc.AuthRoleGrantPermissionRequest(
            name=role,
            perm=aetcd.rpc.Permission(
                permType=PERMISSION_KINDS.index(permission.kind),
                key=permission.key.encode(),
                range_end=permission.range_end.encode(),
            ),
        )
        await self._call(
            lambda c: c.auth_call("RoleGrantPermission", request),
            f"role {role} grant {permission}",
        )

    async def revoke_permission(self, role: str, permission: Permission) -> None:
        request = aetcd.rpc.AuthRoleRevokePermissionRequest(
            role=role, key=permission.key.encode(), range_end=permission.range_end.encode()
        )
        await self._call(
            lambda c: c.auth_call("RoleRevokePermission", request),
            f"role {role} revoke {permission}",
        )

    async def user_roles(self, user: str) -> frozenset[str] | None:
        """The roles granted to ``user``; None if there is no such user."""
        request = aetcd.rpc.AuthUserGetRequest(name=user)
        try:
            reply = await self._call(lambda c: c.auth_call("UserGet", request), f"user get {user}")
        except EtcdError as exc:
            if "not found" in str(exc):
                return None
            raise
        return frozenset(reply.roles)

    async def add_user(self, user: str, password: str) -> None:
        request = aetcd.rpc.AuthUserAddRequest(name=user, password=password)
        await self._call(lambda c: c.auth_call("UserAdd", request), f"user add {user}")

    async def change_password(self, user: str, password: str) -> None:
        request = aetcd.rpc.AuthUserChangePasswordRequest(name=user, password=password)
        await self._call(
            lambda c: c.auth_call("UserChangePassword", request), f"user passwd {user}"
        )

    async def grant_role(self, user: str, role: str) -> None:
        request = aetcd.rpc.AuthUserGrantRoleRequest(user=user, role=role)
        await self._call(
            lambda c: c.auth_call("UserGrantRole", request), f"user {user} grant role {role}"
        )

    async def revoke_role(self, user: str, role: str) -> None:
        request = aetcd.rpc.AuthUserRevokeRoleRequest(name=user, role=role)
        await self._call(
            lambda c: c.auth_call("UserRevokeRole", request), f"user {user} revoke role {role}"
        )

    async def password_matches(self, user: str, password: str) -> bool:
        """Whether etcd (with auth on) accepts ``password`` for ``user``; our token stays."""
        request = aetcd.rpc.AuthenticateRequest(name=user, password=password)
        try:
            await self._call(lambda c: c.auth_call("Authenticate", request), f"authenticate {user}")
        except EtcdError as exc:
            if "authentication failed" in str(exc):
                return False
            raise
        return True

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
        # Events, or the error that ended the stream, or None once it is shut down.
        events: asyncio.Queue[Any] = asyncio.Queue()
        try:
            watcher = await self._call(
                lambda c: c.open_watch(key, range_end, start_revision, events.put),
                f"watch {what}",
            )
        except PermissionDenied:
            raise
        except EtcdError as exc:
            cause = exc.__cause__
            if isinstance(cause, aetcd_errors.RevisionCompactedError):
                raise RevisionCompacted(cause.compacted_revision) from cause
            # A stream that breaks while the watch is being created surfaces
            # as a generic error; it is a broken connection all the same.
            raise EtcdUnavailable(f"etcd watch {what}: {exc}") from exc
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    aetcd_errors._handle_exception(event)  # raises it, translated
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
            await _quietly(watcher.shutdown())
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
