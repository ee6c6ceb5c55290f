"""The outbound side: the app's calls to its peers, routed by consistent hashing."""

from __future__ import annotations

import random
from collections import defaultdict

import grpc

from registry.errors import InvalidName, NoLiveInstance, UnknownService
from sidecar.proxy import CallRejected, Metadata
from sidecar.routing import HASH_KEY_HEADER, SERVICE_HEADER, RoutingTable


class OutboundDirector:
    """Picks the instance for each call from the current RoutingTable (swapped whole on change)."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.table = RoutingTable()
        self.inflight: defaultdict[str, int] = defaultdict(int)
        self._rng = rng or random.Random()

    def direct(self, method: str, metadata: Metadata) -> tuple[str, object]:
        service: str | None = None
        key: str | None = None
        for name, value in metadata:
            if name == SERVICE_HEADER:
                service = value if isinstance(value, str) else value.decode(errors="replace")
            elif name == HASH_KEY_HEADER:
                key = value if isinstance(value, str) else value.decode(errors="replace")
        table = self.table
        try:
            ring = table.ring(table.resolve(service=service, method=method))
        except InvalidName as exc:
            raise CallRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except UnknownService as exc:
            raise CallRejected(grpc.StatusCode.UNIMPLEMENTED, str(exc)) from exc
        except NoLiveInstance as exc:
            raise CallRejected(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        if key is None:
            peer = ring.pick_two(self.inflight, self._rng)
        else:
            peer = ring.choose(key, self.inflight)
        self.inflight[peer.id] += 1
        return peer.address, peer.id

    def done(self, token: object) -> None:
        peer_id = str(token)
        left = self.inflight[peer_id] - 1
        if left > 0:
            self.inflight[peer_id] = left
        else:
            del self.inflight[peer_id]

    def failed(self, error: grpc.aio.AioRpcError, token: object) -> Metadata:
        return ()
