"""The demo service (proto/demo.proto): every reply names the instance that served it.

Run: ``python -m ringmesh.demo --port 0 --instance NAME``; prints one JSON
line with the bound port. Serves reflection and health like a real app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import demo_pb2, demo_pb2_grpc


async def abort_if_asked(context: grpc.aio.ServicerContext) -> None:
    """Test hook: ``x-abort: CODE`` makes the call fail with that status, with the
    ``x-abort-trailer: key=value`` headers as its trailing metadata."""
    metadata = context.invocation_metadata() or ()
    code = next((v for k, v in metadata if k == "x-abort"), None)
    if code is None:
        return
    trailers = tuple(
        tuple(v.split("=", 1)) for k, v in metadata if k == "x-abort-trailer" and "=" in v
    )
    status = getattr(grpc.StatusCode, str(code), grpc.StatusCode.UNKNOWN)
    await context.abort(status, f"aborted as asked ({code})", trailers)


class DemoService(demo_pb2_grpc.DemoServicer):
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.served = 0
        self.inflight = 0

    async def Echo(
        self, request: demo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> demo_pb2.EchoReply:
        self.inflight += 1
        try:
            inflight = self.inflight
            if request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
            self.served += 1
            await abort_if_asked(context)
            # Echo "x-echo", "traceparent" and "ringmesh-caller" request headers back
            # as trailing metadata, so tests can see metadata pass through the mesh.
            echoed = tuple(
                (key if key == "x-echo" else f"x-{key}", value)
                for key, value in context.invocation_metadata()
                if key in ("x-echo", "traceparent", "ringmesh-caller")
            )
            if echoed:
                context.set_trailing_metadata(echoed)
            return demo_pb2.EchoReply(
                text=request.text, instance=self.instance, served=self.served, inflight=inflight
            )
        finally:
            self.inflight -= 1

    async def Count(
        self, request: demo_pb2.CountRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[demo_pb2.EchoReply]:
        for i in range(request.n):
            self.served += 1
            yield demo_pb2.EchoReply(text=str(i), instance=self.instance, served=self.served)

    async def Sum(
        self,
        request_iterator: AsyncIterator[demo_pb2.CountRequest],
        context: grpc.aio.ServicerContext,
    ) -> demo_pb2.SumReply:
        self.served += 1
        total = messages = 0
        async for request in request_iterator:
            total += request.n
            messages += 1
            if messages == 1:
                await abort_if_asked(context)  # while the caller may still be sending
        return demo_pb2.SumReply(total=total, messages=messages, instance=self.instance)

    async def Chat(
        self,
        request_iterator: AsyncIterator[demo_pb2.EchoRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[demo_pb2.EchoReply]:
        async for request in request_iterator:
            self.served += 1
            yield demo_pb2.EchoReply(text=request.text, instance=self.instance, served=self.served)


async def start_app(
    host: str,
    port: int,
    *,
    name: str,
    add: Callable[[grpc.aio.Server], None],
    services: Sequence[str],
    **announce: Any,
) -> grpc.aio.Server:
    """A real app's server: ``add`` puts its servicers on it, plus gRPC health (SERVING)
    and reflection of ``services``; once serving it prints ``{"event": "listening",
    "port": P, **announce}`` (the demo apps of ``ringmesh up``, the tests and examples)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{name}: cannot listen on {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"event": "listening", "port": bound, **announce}), flush=True)
    return server


async def signalled() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(host: str, port: int, instance: str) -> None:
    server = await start_app(
        host,
        port,
        name="demo",
        add=lambda s: demo_pb2_grpc.add_DemoServicer_to_server(DemoService(instance), s),
        services=(demo_pb2.DESCRIPTOR.services_by_name["Demo"].full_name,),
        instance=instance,
    )
    await signalled()
    await server.stop(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringmesh.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--instance", default="demo")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.instance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
