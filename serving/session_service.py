"""rnnlab.v1.Sessions: open, append to, generate from, export, resume and close sessions (thin, over App)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.api.rnnlab.v1 import generation_pb2_grpc as pb_grpc
from serving.app import App
from serving.sessions import SessionNotFound
from serving.status import Code, Refusal


class SessionService(pb_grpc.SessionsServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    async def Open(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext):
        return await self.app.open_session(request.model, request.prompt)

    async def Append(self, request: pb.AppendRequest, context: grpc.aio.ServicerContext):
        return await self.app.append(request.session_id, request.text)

    async def Generate(self, request: pb.SessionGenerateRequest, context: grpc.aio.ServicerContext):
        async for message in self.app.session_generate(request, request.session_id):
            yield message

    async def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext):
        self.app.sessions.close(request.session_id)
        return pb.CloseSessionResponse()

    Close = CloseSession  # the first name of the RPC, kept on the wire (grpc-js clients cannot call it)

    async def Export(self, request: pb.ExportSessionRequest, context: grpc.aio.ServicerContext):
        return self.app.export_session(request.session_id)

    async def Resume(self, request: pb.ResumeSessionRequest, context: grpc.aio.ServicerContext):
        return self.app.resume_session(request.token)

    async def Interact(
        self, request_iterator: AsyncIterator[pb.InteractRequest], context: grpc.aio.ServicerContext
    ):
        app, session_id, owned = self.app, None, False
        try:
            async for request in request_iterator:
                action = request.WhichOneof("action")
                if session_id is None:
                    if action == "open":
                        info = await app.open_session(request.open.model, request.open.prompt)
                    elif action == "resume_token":
                        info = app.resume_session(request.resume_token)
                    elif action == "attach_session_id":
                        info = app.describe(request.attach_session_id)
                    else:
                        raise Refusal(
                            Code.INVALID_ARGUMENT,
                            "the first message must open, attach or resume a session",
                        )
                    session_id = info.session_id
                    owned = action != "attach_session_id" and not request.keep_open
                    yield pb.InteractResponse(session=info)
                elif action == "append":
                    yield pb.InteractResponse(session=await app.append(session_id, request.append))
                elif action == "generate":
                    async for message in app.session_generate(request.generate, session_id):
                        yield pb.InteractResponse(generation=message)
                elif action == "export" and request.export:
                    yield pb.InteractResponse(state=app.export_session(session_id))
                elif action == "export":  # an explicit false: nothing to export, the session as it is
                    yield pb.InteractResponse(session=app.describe(session_id))
                else:
                    raise Refusal(
                        Code.INVALID_ARGUMENT,
                        f"{action or 'an empty message'} is only allowed as the first message",
                    )
        finally:
            if owned:
                with contextlib.suppress(SessionNotFound):
                    app.sessions.close(session_id)
