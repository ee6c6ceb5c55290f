"""``authz/<service>``: which services may call a service (ARCHITECTURE.md, Security).

The value is ``{"allow": ["caller", ...]}``, written sorted and without
duplicates. No record: every mesh peer may call the service. An empty list:
nobody may. A record that does not parse denies every caller until it is
fixed: skipping it would read as "no record", opening the service to every
peer because of a typo (fail closed, logged once per change).

Reading is lenient where it costs nothing (any order, duplicates, extra
fields are accepted) and strict where it matters (every caller a DNS label).
Changes are compare-and-swaps on the key's mod revision, retried on a
conflict, so concurrent operators lose no update.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Self

from registry.errors import InvalidName, RecordError, WriteConflict
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_service
from registry.lease import Backoff, Sleep
from registry.records import load_object, record_error, string_list
from registry.watch import PrefixWatch, watch_backoff

log = logging.getLogger(__name__)

# service -> the callers it allows; a service not in the map allows every peer.
AuthzMap = Mapping[str, frozenset[str]]

DENY_ALL: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AuthzRecord:
    """``authz/<service>``: the services allowed to call it (empty: none)."""

    allow: frozenset[str] = DENY_ALL

    def __post_init__(self) -> None:
        callers = self.allow
        if isinstance(callers, str) or not isinstance(callers, Iterable):
            raise InvalidName(f"allow must be a collection of service names, got {callers!r}")
        object.__setattr__(self, "allow", frozenset(validate_service(c) for c in callers))

    def allows(self, caller: str) -> bool:
        return caller in self.allow

    def allowing(self, caller: str) -> Self:
        return type(self)(self.allow | {validate_service(caller)})

    def denying(self, caller: str) -> Self:
        return type(self)(self.allow - {validate_service(caller)})

    def to_json(self) -> bytes:
        return json.dumps({"allow": sorted(self.allow)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Parse a stored record; RecordError (one bounded line) on anything malformed."""
        doc = load_object(raw)
        callers = string_list(doc, "allow", required=True)
        try:
            return cls(frozenset(callers))
        except InvalidName as exc:
            raise record_error(f"field 'allow': {exc}") from exc


def permits(rules: AuthzMap, callee: str, caller: str) -> bool:
    """The check the inbound side makes: no rule for ``callee`` lets every peer in."""
    allowed = rules.get(callee)
    return allowed is None or caller in allowed


# -- reading and changing one record --------------------------------------------------


async def read_authz(client: EtcdClient, layout: KeyLayout, service: str) -> AuthzRecord | None:
    """The record of ``service``, None if it has none; RecordError naming the key if malformed."""
    found = await client.get(layout.authorization(service))
    return None if found is None else _parse_stored(found.key, found.value)


def _parse_stored(key: str, value: bytes) -> AuthzRecord:
    try:
        return AuthzRecord.from_json(value)
    except RecordError as exc:
        raise record_error(f"{key} does not parse: {exc}") from exc


CAS_ATTEMPTS = 20  # each lost round means another writer won: 20 covers 20 writers at once
CAS_BACKOFF_S = 0.01  # doubling, full jitter, capped below
CAS_BACKOFF_CAP_S = 0.25


async def change_authz(
    client: EtcdClient,
    layout: KeyLayout,
    service: str,
    change: Callable[[AuthzRecord | None], AuthzRecord],
    *,
    attempts: int = CAS_ATTEMPTS,
    sleep: Sleep = asyncio.sleep,
    jitter: Callable[[], float] = random.random,
) -> tuple[AuthzRecord, bool]:
    """Read the record, apply ``change``, write it back only if nobody wrote in between.

    Returns the record now stored and whether this call wrote it (an unchanged
    record is not written again). ``change`` may raise to refuse (e.g. a deny on a
    missing record); a malformed stored record raises RecordError and is left as
    it is. WriteConflict after ``attempts`` lost rounds.
    """
    key = layout.authorization(service)
    for attempt in range(attempts):
        found = await client.get(key)
        current = None if found is None else _parse_stored(key, found.value)
        wanted = change(current)
        if wanted == current:
            return wanted, False
        revision = 0 if found is None else found.mod_revision
        if await client.put_if_unchanged(key, wanted.to_json(), lease=None, mod_revision=revision):
            return wanted, True
        await sleep(jitter() * min(CAS_BACKOFF_CAP_S, CAS_BACKOFF_S * 2**attempt))
    raise WriteConflict(f"{key} kept changing under this update ({attempts} tries): try again")


# -- watching every record -------------------------------------------------------------


class AuthzWatch:
    """Keeps every ``authz/`` record current; hands the whole map to ``on_change``.

    ``on_change(rules)`` gets ``service -> allowed callers`` after the first
    listing (even an empty one) and then each time the map changes; a service
    missing from it allows every peer, one mapped to an empty set allows none
    (also when its record does not parse). While etcd is away the last map stays
    in force. ``rules`` and ``ready`` (set after the first listing) are the
    current state for whoever polls instead.
    """

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        on_change: Callable[[AuthzMap], None] = lambda _rules: None,
        *,
        sleep: Sleep = asyncio.sleep,
        backoff: Callable[[], Backoff] = watch_backoff,
    ) -> None:
        self._layout = layout
        self._on_change = on_change
        self._delivered = False
        self.rules: AuthzMap = MappingProxyType({})
        self._watch = PrefixWatch(
            client,
            layout.authorizations,
            parse=self._parse,
            on_change=self._publish,
            logger=log,
            name="authz",
            keeping="enforcing the last authz records",
            sleep=sleep,
            backoff=backoff,
        )
        self.ready = self._watch.ready

    @property
    def revision(self) -> int:
        """The last revision applied."""
        return self._watch.revision

    async def run(self) -> None:
        await self._watch.run()

    def _parse(
        self, key: str, value: bytes, *, lease: int, mod_revision: int
    ) -> tuple[str, frozenset[str]]:
        try:
            service = self._layout.parse_last(key, self._layout.authorizations)
        except InvalidName as exc:  # no service has this name: nothing to enforce
            raise RecordError(f"bad key: {exc}") from exc
        try:
            return service, AuthzRecord.from_json(value).allow
        except RecordError as exc:
            log.warning("%s does not parse (%s): denying every caller of %s", key, exc, service)
            return service, DENY_ALL

    def _publish(
        self,
        _revision: int,
        entries: Mapping[str, tuple[str, frozenset[str]]],
        _changed: str | None,
    ) -> None:
        rules = dict(sorted(entries.values(), key=lambda entry: entry[0]))
        if self._delivered and rules == self.rules:
            return
        self.rules = MappingProxyType(rules)
        self._delivered = True
        self._on_change(self.rules)
