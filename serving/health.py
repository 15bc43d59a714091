"""Standard gRPC health checking that drains: NOT_SERVING for Check, and open Watch streams end.

grpc's own aio servicer keeps a Watch open until the server stops, so one watching load balancer made
shutdown wait out the whole grace period (issue 19); here ``drain()`` sends NOT_SERVING to every
watcher and ends its stream, while Check keeps answering NOT_SERVING until the server stops.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

Response = health_pb2.HealthCheckResponse


class DrainingHealth(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._draining = False
        self._version = 0  # bumped at every status change, so a watcher never misses one
        self._changes = asyncio.Condition()

    async def _set(self, service: str, status: Response.ServingStatus) -> None:
        await super()._set(service, status)
        await self._bump()

    async def _bump(self) -> None:
        async with self._changes:
            self._version += 1
            self._changes.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        last = None
        while True:
            seen = self._version
            status = self._server_status.get(request.service, Response.SERVICE_UNKNOWN)
            if self._draining:
                status = Response.NOT_SERVING
            if status != last:
                await context.write(Response(status=status))
                last = status
            if self._draining:
                return
            async with self._changes:
                await self._changes.wait_for(lambda seen=seen: self._version != seen)

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on; open watches get NOT_SERVING and end."""
        self._draining = True
        await self.enter_graceful_shutdown()
        await self._bump()
