"""Bad input to rnnlab.v1.Forecasting on a real server (committed tiny-ts, window 5, one column): every row
gets its status and the BadRequest field naming the field and its index; a refused stream message leaves
the stream's state exactly as it was (the kept session exports the same window, count and last time), and
the server keeps serving (health, and a normal Forecast, after each row).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import state_token
from serving.api.rnnlab.v1 import forecasting_pb2 as fpb
from serving.client import Client, error_details
from serving.harness import ServerThread
from tests.committed_bundles import FORECASTER, committed
from tests.serving.serve_helpers import STATE_KEY, config

Code = grpc.StatusCode
MODEL = FORECASTER
KEY = STATE_KEY.encode()
NAN, INF = float("nan"), float("inf")
GARBAGE = b"\xff" * 11  # a varint longer than 10 bytes: corrupt for every message type


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("forecast-hostile")
    shutil.copytree(committed(MODEL), models / MODEL)
    with ServerThread(config(models, forecast_max_horizon=50)) as running:
        yield running


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def obs(*values: float, time: float | None = None) -> fpb.Observation:
    return fpb.Observation(values=values) if time is None else fpb.Observation(values=values, time=time)


def kept_session(client: Client) -> tuple[str, bytes]:
    """A kept session that has read 6 observations at times 0..5 -> (session id, its state token)."""
    history = [obs(0.1 * t, time=t) for t in range(6)]
    request = fpb.ForecastStreamRequest(model=MODEL, keep_open=True, observations=history, export=True)
    [reply] = client.forecast_stream([request])
    return reply.session_id, reply.state_token


def exported(client: Client, session: str) -> state_token.SessionState:
    [reply] = client.forecast_stream([fpb.ForecastStreamRequest(session_id=session, export=True)])
    return state_token.decode(reply.state_token, KEY)


@dataclass
class Row:
    case: str
    messages: list[dict]  # ForecastStreamRequest fields after the first, which attaches the kept session
    field: str
    code: grpc.StatusCode = Code.INVALID_ARGUMENT


STREAM_ROWS = [
    Row("NaN value", [{"observations": [obs(1.0, time=6), obs(NAN, time=7)]}], "observations[1].values[0]"),
    Row("infinite value", [{"observations": [obs(INF)]}], "observations[0].values[0]"),
    Row("minus infinity", [{"observations": [obs(0.5), obs(0.5), obs(-INF)]}], "observations[2].values[0]"),
    Row("two values for one column", [{"observations": [obs(1.0, 2.0)]}], "observations[0].values"),
    Row("no values", [{"observations": [obs(0.2), fpb.Observation()]}], "observations[1].values"),
    Row("time before the stream's last", [{"observations": [obs(1.0, time=3)]}], "observations[0].time"),
    Row("time equal to the stream's last", [{"observations": [obs(1.0, time=5)]}], "observations[0].time"),
    Row(
        "duplicate time in a message",
        [{"observations": [obs(1, time=6), obs(2, time=6)]}],
        "observations[1].time",
    ),
    Row("time not finite", [{"observations": [obs(1.0, time=NAN)]}], "observations[0].time"),
    Row("horizon over the limit", [{"observations": [obs(1.0)], "horizon": 51}], "horizon"),
    Row("negative horizon", [{"horizon": -1}], "horizon"),
    Row("model in a later message", [{}, {"model": MODEL, "observations": [obs(1.0)]}], "model"),
    Row(
        "bad value after good messages",
        [{"observations": [obs(1.0, time=6)]}, {"observations": [obs(NAN)]}],
        "observations[0].values[0]",
    ),
]


def _attach_and_send(client: Client, session: str, row: Row) -> list[fpb.ForecastStreamResponse]:
    requests = []
    for n, fields in enumerate(row.messages):
        request = fpb.ForecastStreamRequest(**fields)
        if n == 0:
            request.session_id = session
        requests.append(request)
    return list(client.forecast_stream(requests))


def assert_still_serving(client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert len(client.forecast(MODEL, [[0.1 * t] for t in range(6)], 2)) == 2


@pytest.mark.parametrize("row", STREAM_ROWS, ids=[row.case for row in STREAM_ROWS])
def test_a_bad_stream_message_is_refused_naming_its_field_and_changes_nothing(client, row):
    session, token = kept_session(client)
    before = state_token.decode(token, KEY)
    with pytest.raises(grpc.RpcError) as caught:
        _attach_and_send(client, session, row)
    assert caught.value.code() == row.code, caught.value.details()
    details = error_details(caught.value)
    assert [f for f, _ in details.fields] == [row.field], caught.value.details()
    assert caught.value.details().startswith(row.field) or row.field in ("horizon", "model")
    good = len(row.messages) > 1 and "observations" in row.messages[0]  # a good message went first
    after = exported(client, session)
    assert after.tokens == before.tokens + good and after.extra["time"] == (6.0 if good else 5.0)
    if not good:  # the window, the adaptive interval rule's level and its pending intervals: as before
        assert after.extra == before.extra and len(after.state) == len(before.state) == 6
        for got, want in zip(after.state, before.state, strict=True):
            np.testing.assert_array_equal(got, want)
    assert_still_serving(client)


FORECAST_ROWS = [
    ("history shorter than the window", {"history": [obs(1.0)] * 4}, "history"),
    ("NaN in the history", {"history": [obs(1.0)] * 2 + [obs(NAN)] + [obs(1.0)] * 3}, "history[2].values[0]"),
    ("wrong width", {"history": [obs(1.0, 2.0)] * 6}, "history[0].values"),
    ("history out of order", {"history": [obs(1.0, time=t) for t in (1, 0, 2, 3, 4)]}, "history[1].time"),
    ("horizon over the limit", {"history": [obs(1.0)] * 5, "horizon": 1000}, "horizon"),
]


@pytest.mark.parametrize("case,fields,field", FORECAST_ROWS, ids=[r[0] for r in FORECAST_ROWS])
def test_a_bad_forecast_call_is_refused_naming_its_field(client, case, fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.forecasting.Forecast(fpb.ForecastRequest(model=MODEL, **fields))
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert [f for f, _ in error_details(caught.value).fields] == [field]
    assert_still_serving(client)


def _raw(client: Client, method: str, data: bytes):
    path = f"/rnnlab.v1.Forecasting/{method}"
    if method == "ForecastStream":
        return list(client.channel.stream_stream(path)(iter([data]), timeout=10))
    return client.channel.unary_unary(path)(data, timeout=10)


@pytest.mark.parametrize("method", ["Forecast", "ForecastStream", "ListForecasters"])
def test_garbage_bytes_are_invalid_argument_for_every_rpc(client, method):
    with pytest.raises(grpc.RpcError) as caught:
        _raw(client, method, GARBAGE)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "MALFORMED_REQUEST"
    assert_still_serving(client)


def _first(client: Client, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(client.forecast_stream([fpb.ForecastStreamRequest(observations=[obs(1.0)], **fields)]))
    return caught.value


def test_bad_starts_are_refused(client):
    assert _first(client).code() == Code.INVALID_ARGUMENT  # no model, session or token
    assert _first(client, model="nope").code() == Code.NOT_FOUND
    assert error_details(_first(client, session_id="nope")).reason == "SESSION_NOT_FOUND"
    _, token = kept_session(client)
    assert error_details(_first(client, state_token=token[:-5])).reason == "TOKEN_SIGNATURE"
    snapshot = state_token.decode(token, KEY)
    snapshot.state = [np.zeros((2, 1, 8), np.float32)]  # a language model's state shape, signed
    error = _first(client, state_token=state_token.encode(snapshot, KEY))
    assert (error.code(), error_details(error).reason) == (Code.INVALID_ARGUMENT, "TOKEN_MALFORMED")
    good = state_token.decode(token, KEY)
    for extra in ({"time": "5"}, {"time": NAN}, {"other": 1.0}, {f"k{i}": 1.0 for i in range(9)}):
        good.extra = extra  # signed with the right key, but not a forecast stream's header
        error = _first(client, state_token=state_token.encode(good, KEY))
        assert (error.code(), error_details(error).reason) == (Code.INVALID_ARGUMENT, "TOKEN_MALFORMED")
    good = state_token.decode(token, KEY)
    window, steps, factors, mean, half, scores = good.state
    assert steps.tolist() == [3.0] and good.extra["alpha_t"] == 0.1  # one forecast of 3 steps pending
    for state in (
        [window, steps + 1, factors, mean, half, scores],
        [window, steps, factors, mean, -half, scores],
        [window, steps, factors, mean, half[:2], scores],
        [window, steps, factors, mean, half, np.ones((51, 1), np.float32)],
    ):
        good.state = state  # the adaptive rule's arrays do not fit the model (H = 3) or the rule
        error = _first(client, state_token=state_token.encode(good, KEY))
        assert (error.code(), error_details(error).reason) == (Code.INVALID_ARGUMENT, "TOKEN_MALFORMED")
    lo, hi = mean - half, mean + half  # the rule's arrays before it kept recent scores
    for old_state in ([window], [window, steps, lo, hi]):  # tokens from before the rule, before its scores
        good.state, good.extra = old_state, {"time": 5.0, "alpha_t": 0.3}
        old = fpb.ForecastStreamRequest(
            state_token=state_token.encode(good, KEY), observations=[obs(1.0, time=6)], export=True
        )
        [reply] = client.forecast_stream([old])
        assert reply.observations == 7 and len(reply.steps) == 3
        resumed = state_token.decode(reply.state_token, KEY)  # the rule started afresh
        assert resumed.extra["alpha_t"] == 0.1 and len(resumed.state) == 6
    assert_still_serving(client)


def wait_for_count(registry, labels: dict[str, str], value: float) -> None:
    """Until rnnlab_requests_total{labels} reaches ``value`` (the server counts as the handler ends, which
    may be just after the client has its answer); fails after 5 s."""
    deadline = time.monotonic() + 5
    while (registry.get_sample_value("rnnlab_requests_total", labels) or 0) < value:
        assert time.monotonic() < deadline, f"{labels} not counted"
        time.sleep(0.01)


def test_refusals_are_counted_with_the_status_the_client_saw(server, client):
    """The one interceptor counts every Forecasting call under its service label and the code sent."""
    registry = server.server.metrics.registry
    refused = {"method": "ForecastingService.ForecastStream", "code": "INVALID_ARGUMENT"}
    ok = {"method": "ForecastingService.Forecast", "code": "OK"}
    before = {
        k: registry.get_sample_value("rnnlab_requests_total", v) or 0 for k, v in (("r", refused), ("o", ok))
    }
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            list(client.forecast_stream([fpb.ForecastStreamRequest(model=MODEL, observations=[obs(NAN)])]))
    client.forecast(MODEL, [[0.1 * t] for t in range(6)])
    wait_for_count(registry, refused, before["r"] + 3)
    wait_for_count(registry, ok, before["o"] + 1)
