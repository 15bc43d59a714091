"""Standard gRPC health checking that drains: NOT_SERVING for Check, and open Watch streams end.

grpc's own aio servicer keeps a Watch open until the server stops, so one watching load balancer made
shutdown wait out the whole grace period (issue 19); here ``drain()`` sends NOT_SERVING to every
watcher and ends its stream, while Check keeps answering NOT_SERVING until the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DrainingHealth(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if not self._draining.is_set():
            watching = asyncio.ensure_future(super().Watch(request, context))
            drained = asyncio.ensure_future(self._draining.wait())
            try:
                await asyncio.wait({watching, drained}, return_when=asyncio.FIRST_COMPLETED)
                if watching.done():  # the stream failed (client gone): its error, not a last message
                    return watching.result()
            finally:
                for task in (watching, drained):
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on; open watches get NOT_SERVING and end."""
        await self.enter_graceful_shutdown()
        self._draining.set()
