"""rnnlab.v1.Generation: stream tokens from a prompt; list and describe the models (thin, over App)."""

from __future__ import annotations

import grpc

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.app import App
from serving.engine import Request


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        app = self.app
        model = app.model(request.model)
        max_tokens, params, stops = app.generation_options(
            request.max_tokens, request.sampling, list(request.stop)
        )
        ids = app.encode(model, request.prompt, "prompt")
        with app.stream_slot():
            stream = model.engine.submit(Request(ids, max_tokens, params, stops, request.logprobs))
            async for message in app.relay(model, stream):
                yield message

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        return pb.ListModelsResponse(models=[m.info for _, m in sorted(self.app.models.items())])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        return self.app.model(request.model).info
