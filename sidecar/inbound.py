"""The inbound side: calls from peers, forwarded to the local app."""

from __future__ import annotations

import grpc

from sidecar.proxy import Metadata

NOT_PROCESSED_HEADER = "ringmesh-not-processed"
_NOT_PROCESSED: Metadata = ((NOT_PROCESSED_HEADER, "1"),)
# What gRPC core says when no connection to the app could be made: the call
# never reached the app, so the caller may safely send it elsewhere.
_CONNECT_FAILURES = ("failed to connect to all addresses", "Failed to connect to remote host")


def never_reached_app(error: grpc.aio.AioRpcError) -> bool:
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = error.details() or ""
    return any(marker in details for marker in _CONNECT_FAILURES)


class InboundDirector:
    """Sends every call to the app and counts what is in flight."""

    def __init__(self, app_address: str) -> None:
        self.app_address = app_address
        self.inflight = 0

    def direct(self, method: str, metadata: Metadata) -> tuple[str, object]:
        self.inflight += 1
        return self.app_address, None

    def done(self, token: object) -> None:
        self.inflight -= 1

    def failed(self, error: grpc.aio.AioRpcError, token: object) -> Metadata:
        return _NOT_PROCESSED if never_reached_app(error) else ()
