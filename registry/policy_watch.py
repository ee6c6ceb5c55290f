"""PolicyWatch: one service's scaling policy, kept current by a watch.

A sidecar writes its ``load/`` record early only when the field its service's
policy scales on moved (sidecar/load.py, ``worth_writing``), so it needs to
know that field: ``metric`` is the policy's, or ``rps`` while the service has
no policy (or one that does not parse: logged, and the scaler skips it too).
While etcd is away the last policy stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from registry.errors import RecordError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from registry.lease import Backoff, Sleep
from registry.scaling import RPS, Policy
from registry.watch import PrefixWatch, watch_backoff

log = logging.getLogger(__name__)


def _raw(key: str, value: bytes, *, lease: int, mod_revision: int) -> bytes:
    return value  # parsed only for the one key that matters (below)


class PolicyWatch:
    """``metric``: what ``service``'s policy scales on (``rps`` without one)."""

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        service: str,
        *,
        sleep: Sleep = asyncio.sleep,
        backoff: Callable[[], Backoff] = watch_backoff,
    ) -> None:
        self._key = layout.policy(service)
        self.policy: Policy | None = None
        # The key as a prefix also matches longer names ("cache" and "cache2"): those
        # entries are listed and ignored, a few bytes each.
        self._watch = PrefixWatch(
            client,
            self._key,
            parse=_raw,
            on_change=self._changed,
            logger=log,
            name="policy",
            keeping="writing load/ on the last policy's metric",
            sleep=sleep,
            backoff=backoff,
        )
        self.ready = self._watch.ready

    @property
    def metric(self) -> str:
        return RPS if self.policy is None else self.policy.metric

    async def run(self) -> None:
        await self._watch.run()

    def _changed(self, revision: int, entries: Mapping[str, bytes], changed: str | None) -> None:
        if changed is not None and changed != self._key:
            return
        raw = entries.get(self._key)
        if raw is None:
            self.policy = None
            return
        try:
            self.policy = Policy.from_json(raw)
        except RecordError as exc:
            log.warning("ignoring the policy at %s: %s", self._key, exc)
            self.policy = None
