"""The example frontend of deploy/local/mesh.yaml: a Demo service that asks the backend.

Its Echo calls the backend's Echo through ``--backend`` (its sidecar's outbound
port) with ``ringmesh-service: backend`` and ``ringmesh-hash-key: <text>``, and
answers ``"<backend instance>: <text>"``, so one service is seen calling another
through the mesh. Like ``python -m ringmesh.demo`` it prints one JSON line once
it listens, and serves health and reflection.

Run: ``python frontend.py --port 0 --backend 127.0.0.1:15001``
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from proto import demo_pb2, demo_pb2_grpc
from ringmesh.demo import signalled, start_app

DEFAULT_TIMEOUT_S = 5.0  # for the backend call when the caller set no deadline


class Frontend(demo_pb2_grpc.DemoServicer):
    def __init__(self, channel: grpc.aio.Channel, backend: str, instance: str) -> None:
        self.backend_stub = demo_pb2_grpc.DemoStub(channel)
        self.backend = backend
        self.instance = instance
        self.served = 0

    async def Echo(
        self, request: demo_pb2.EchoRequest, context: grpc.aio.ServicerContext
    ) -> demo_pb2.EchoReply:
        left = context.time_remaining()
        try:
            reply = await self.backend_stub.Echo(
                demo_pb2.EchoRequest(text=request.text, delay_ms=request.delay_ms),
                metadata=(("ringmesh-service", self.backend), ("ringmesh-hash-key", request.text)),
                timeout=DEFAULT_TIMEOUT_S if left is None else max(left, 0.0),
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"calling {self.backend}: {exc.details()}")
        self.served += 1
        return demo_pb2.EchoReply(
            text=f"{reply.instance}: {reply.text}", instance=self.instance, served=self.served
        )


async def serve(host: str, port: int, backend: str, service: str, instance: str) -> None:
    async with grpc.aio.insecure_channel(backend) as channel:
        server = await start_app(
            host,
            port,
            name="frontend",
            add=lambda s: demo_pb2_grpc.add_DemoServicer_to_server(
                Frontend(channel, service, instance), s
            ),
            services=(demo_pb2.DESCRIPTOR.services_by_name["Demo"].full_name,),
            instance=instance,
            backend=backend,
        )
        await signalled()
        await server.stop(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frontend.py", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--backend", required=True, metavar="HOST:PORT", help="a sidecar's outbound port"
    )
    parser.add_argument("--backend-service", default="backend", help="the service it calls")
    parser.add_argument("--instance", default="frontend", help="its name in replies")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.backend, args.backend_service, args.instance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
