"""What the app serves, learnt once from its gRPC reflection service.

The sidecar registers the app's gRPC services (for method-path routing) and
its unary methods (so every sidecar can take the cheap unary proxy path).
An app without reflection still works: its calls take the stream path and
callers name the service with ``ringmesh-service`` metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

log = logging.getLogger(__name__)

_INFRASTRUCTURE = ("grpc.reflection.", "grpc.health.")


@dataclass(frozen=True)
class AppSurface:
    grpc_services: tuple[str, ...] = ()
    unary_methods: tuple[str, ...] = ()


def _reflect(address: str) -> AppSurface:
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        services = sorted(s for s in database.get_services() if not s.startswith(_INFRASTRUCTURE))
        unary = []
        for name in services:
            for method in pool.FindServiceByName(name).methods:
                if not method.client_streaming and not method.server_streaming:
                    unary.append(f"/{name}/{method.name}")
        return AppSurface(tuple(services), tuple(sorted(unary)))


async def discover(address: str, *, within: float = 5.0) -> AppSurface:
    """Ask the app's reflection service; an empty surface if it has none."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_reflect, address), within)
    except Exception as exc:  # reflection only buys the cheaper unary path: never fatal
        log.info(
            "app at %s offers no usable reflection (%s): methods take the stream path",
            address,
            type(exc).__name__,
        )
        return AppSurface()


async def wait_reachable(address: str, *, interval: float = 0.05) -> None:
    """Wait until the app accepts TCP connections (forever: the app may start later)."""
    host, _, port = address.rpartition(":")
    warned = False
    while True:
        try:
            _reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError as exc:
            if not warned:
                log.warning("waiting for the app at %s: %s", address, exc)
                warned = True
            await asyncio.sleep(interval)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
