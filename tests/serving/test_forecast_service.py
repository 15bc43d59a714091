"""rnnlab.v1.Forecasting on a real server on 127.0.0.1 with the committed forecaster tests/bundles/tiny-ts
(GRU, window 5, horizon 3) beside a language model, real onnxruntime, no torch: Forecast against the
runtime, streams against Forecast on the same history, batched streams against solo streams, resumption
on a second server, kept sessions, health and reflection, and the client CLI. Bad input is
tests/serving/test_forecast_hostile.py.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import state_token
from serving.api.rnnlab.v1 import forecasting_pb2 as fpb
from serving.bundle import BundleError, write_manifest
from serving.client import Client, error_details, observations
from serving.client_cli import main as client_main
from serving.config import ServerConfig
from serving.conformal import ALPHA, factor
from serving.forecast_runtime import ForecastRuntime
from serving.harness import ServerThread
from serving.transforms import TransformError
from tests.committed_bundles import FORECASTER, committed
from tests.serving.serve_helpers import STATE_KEY, config

MODEL = FORECASTER
# 003's series: sin(t) + noise at t = 0, 0.1, ...; here without noise, a little beyond the training range.
SERIES = [[math.sin(0.1 * t) + 0.05 * math.cos(0.7 * t)] for t in range(60)]
FRESH = float(factor(ALPHA, np.zeros((0, 1), np.float32))[0])  # a fresh stream's interval factor


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast-models")
    for name in (MODEL, "tiny"):
        shutil.copytree(committed(name), root / name)
    return root


@pytest.fixture(scope="module")
def server(models):
    with ServerThread(config(models)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def runtime():
    return ForecastRuntime.load(committed(MODEL))


def means(steps) -> np.ndarray:
    """ForecastStep messages -> (h, 3, D): mean, lower, upper."""
    return np.array([[s.mean, s.lower, s.upper] for s in steps])


def stream(client: Client, rows, first: dict | None = None, **each) -> list[fpb.ForecastStreamResponse]:
    """One message per row; ``first`` holds the first message's start fields (default: the model)."""
    requests = []
    for n, row in enumerate(rows):
        request = fpb.ForecastStreamRequest(observations=observations([row]), **each)
        if n == 0:
            for key, value in (first or {"model": MODEL}).items():
                setattr(request, key, value)
        requests.append(request)
    return list(client.forecast_stream(requests))


def test_the_runtime_reads_the_manifest(runtime):
    assert (runtime.window, runtime.horizon, runtime.columns, runtime.model) == (5, 3, ["x"], "gru")
    assert runtime.level == 0.9 and runtime.state_bytes == 20
    default = runtime.forecast_history(None, 7)  # the training series' last window, stored in the bundle
    assert default.mean.shape == (1, 7, 1) and np.all(default.lower < default.mean)
    assert np.all(default.mean < default.upper)


def test_a_broken_forecast_manifest_is_refused_naming_it(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(committed(MODEL), bundle)
    manifest = bundle / "manifest.json"
    data = json.loads(manifest.read_text())
    data["forecast"]["scaler"]["std"] = [0.0]
    write_manifest(bundle, {k: v for k, v in data.items() if k not in ("files", "file_sizes")})
    with pytest.raises(BundleError, match=r"manifest.json: forecast.scaler.std must be positive"):
        ForecastRuntime.load(bundle)


def _with_forecast(tmp_path, **fields) -> ForecastRuntime:
    """The committed bundle (no transform: made before it) with ``fields`` set in its forecast object."""
    bundle = tmp_path / "t"
    shutil.copytree(committed(MODEL), bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    data["forecast"].update(fields)
    write_manifest(bundle, {k: v for k, v in data.items() if k not in ("files", "file_sizes")})
    return ForecastRuntime.load(bundle)


def test_a_transform_in_the_manifest_is_applied_around_the_graph(runtime, tmp_path):
    """log: the history goes in as log values, the mean and both interval ends come out through exp; a
    bundle without a transform (the committed one) is the identity."""
    assert "transform" not in runtime.manifest.data["forecast"] and runtime.transform.name == "none"
    logged = _with_forecast(tmp_path, transform={"name": "log", "lambda": []})
    history = np.exp(np.array(SERIES))
    got, plain = logged.forecast_history(history, 5), runtime.forecast_history(np.array(SERIES), 5)
    for ours, theirs in ((got.mean, plain.mean), (got.lower, plain.lower), (got.upper, plain.upper)):
        np.testing.assert_allclose(ours, np.exp(theirs), rtol=1e-6)
    np.testing.assert_allclose(got.sigma, (got.upper - got.lower) / (2 * logged.z))
    with pytest.raises(TransformError, match=r"column 'x', row 58: -1 is not positive"):
        logged.forecast_history(np.r_[history[:57], [[-1.0]], history[58:]], 5)


def test_a_bad_transform_in_the_manifest_is_refused_naming_it(tmp_path):
    for bad, message in (
        ({"name": "cube"}, "unknown transform 'cube'"),
        ({"name": "boxcox", "lambda": [0.5, 1.0]}, "one number per column"),
    ):
        with pytest.raises(BundleError, match=rf"manifest.json: forecast.transform.*{message}"):
            _with_forecast(tmp_path / bad["name"], transform=bad)


def test_list_forecasters(client):
    [info] = client.forecasters()
    assert (info.name, info.model, list(info.columns), info.window, info.horizon) == (
        MODEL,
        "gru",
        ["x"],
        5,
        3,
    )
    # the window (5 x 1 float32), at most 3 pending forecasts of 3, 2 and 1 steps (counts, factors, means,
    # half-widths) and 50 recent scores
    assert info.max_horizon == 256 and len(info.bundle_digest) == 64
    assert info.state_bytes == 4 * (5 + 3 + 3 + 2 * 6 + 50)
    assert "rolling_origin.mase" in info.evaluation


@pytest.mark.parametrize("horizon", [0, 1, 3, 10])
def test_forecast_equals_the_runtime(client, runtime, horizon):
    steps = client.forecast(MODEL, SERIES[:20], horizon)
    want = runtime.forecast_history(np.array(SERIES[:20]), horizon or 3)
    assert [s.step for s in steps] == list(range(1, (horizon or 3) + 1))
    got = means(steps)
    np.testing.assert_allclose(got[:, 0], want.mean[0], atol=1e-6)
    np.testing.assert_allclose(got[:, 1], want.lower[0], atol=1e-6)
    np.testing.assert_allclose(got[:, 2], want.upper[0], atol=1e-6)


def test_a_stream_forecasts_as_forecast_on_its_history(client):
    replies = stream(client, SERIES[:12], horizon=4)
    assert [r.observations for r in replies] == list(range(1, 13))
    assert [len(r.steps) for r in replies] == [0] * 4 + [4] * 8  # nothing until the window is full
    factors = []
    for k in range(5, 13):  # the same means; the stream's interval is the calibrated one times its factor
        got, want = means(replies[k - 1].steps), means(client.forecast(MODEL, SERIES[:k], 4))
        np.testing.assert_allclose(got[:, 0], want[:, 0], atol=1e-5)
        ratio = (got[:, 2] - got[:, 1]) / (want[:, 2] - want[:, 1])
        np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-4)
        factors.append(ratio[0, 0])
    # a fresh stream's set is the calibrated stand-ins: their conformal quantile, 1.0307; then it adapts
    assert factors[0] == pytest.approx(FRESH, abs=1e-5) and len(set(np.round(factors, 4))) > 1


def test_several_observations_per_message_equal_one_at_a_time(client):
    one_by_one = stream(client, SERIES[:9])
    request = fpb.ForecastStreamRequest(model=MODEL, observations=observations(SERIES[:9]))
    [together] = client.forecast_stream([request])
    assert together.observations == 9
    np.testing.assert_allclose(means(together.steps)[:, 0], means(one_by_one[-1].steps)[:, 0], atol=1e-5)
    # one message served nothing before it: Forecast's means, and its calibrated interval times a fresh
    # stream's factor
    got, want = means(together.steps), means(client.forecast(MODEL, SERIES[:9], 0))
    np.testing.assert_allclose(got[:, 0], want[:, 0], atol=1e-5)
    np.testing.assert_allclose(got[:, 2] - got[:, 1], FRESH * (want[:, 2] - want[:, 1]), rtol=1e-5)


def _series(k: int) -> list[list[float]]:
    return [[math.sin(0.1 * t + 0.4 * k) * (1 + 0.1 * k)] for t in range(25)]


def test_batched_streams_equal_solo_streams(server, client):
    solo = [means(stream(client, _series(k))[-1].steps) for k in range(12)]
    registry = server.server.metrics.registry
    calls_before = registry.get_sample_value("rnnlab_forecast_batch_streams_count", {"model": MODEL}) or 0
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(12)

    def run(k: int) -> None:
        with Client(f"127.0.0.1:{server.port}") as own:
            barrier.wait()
            results[k] = means(stream(own, _series(k))[-1].steps)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(12):
        np.testing.assert_allclose(results[k], solo[k], atol=1e-5)
    calls = registry.get_sample_value("rnnlab_forecast_batch_streams_count", {"model": MODEL}) - calls_before
    assert calls < 12 * 25  # some ORT calls carried several streams' observations


def test_a_state_token_resumes_on_a_second_server(models, client):
    whole = stream(client, SERIES[:20], horizon=5)
    [token] = client.forecast_stream([fpb.ForecastStreamRequest(model=MODEL, export=True)])
    assert token.state_token and token.observations == 0  # an empty stream exports an empty window
    exported = stream(client, SERIES[:11], horizon=5, export=True)[-1]
    assert state_token.decode(exported.state_token, STATE_KEY.encode()).extra["alpha_t"] != 0.1
    with ServerThread(config(models)) as other, Client(f"127.0.0.1:{other.port}") as second:
        rest = stream(second, SERIES[11:20], {"state_token": exported.state_token}, horizon=5)
    assert [r.observations for r in rest] == list(range(12, 21))
    for got, want in zip(rest, whole[11:], strict=True):  # the intervals too: the rule's level went along
        np.testing.assert_allclose(means(got.steps), means(want.steps), atol=1e-5)


def test_a_token_signed_with_another_key_or_for_another_bundle_is_refused(models, client):
    request = fpb.ForecastStreamRequest(model=MODEL, observations=observations(SERIES[:6]), export=True)
    [reply] = client.forecast_stream([request])
    token = reply.state_token
    other_key = ServerConfig(models=str(models), port=0, state_key="another key").validate()
    with (
        ServerThread(other_key) as other,
        Client(f"127.0.0.1:{other.port}") as c,
        pytest.raises(grpc.RpcError) as caught,
    ):
        stream(c, SERIES[6:7], {"state_token": token})
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    snapshot = state_token.decode(token, STATE_KEY.encode())
    assert snapshot.tokens == 6 and snapshot.state[0].shape == (1, 5, 1)
    snapshot.bundle_digest = "0" * 64
    with pytest.raises(grpc.RpcError) as caught:
        stream(client, SERIES[6:7], {"state_token": state_token.encode(snapshot, STATE_KEY.encode())})
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value).reason == "TOKEN_OTHER_VERSION"


def test_a_kept_session_is_attached_to_and_busy_while_attached(client):
    whole = stream(client, SERIES[:10])
    kept = stream(client, SERIES[:6], {"model": MODEL, "keep_open": True})
    session = kept[-1].session_id
    rest = stream(client, SERIES[6:10], {"session_id": session})
    np.testing.assert_allclose(means(rest[-1].steps), means(whole[-1].steps), atol=1e-5)
    assert rest[-1].observations == 10

    def attach():
        yield fpb.ForecastStreamRequest(session_id=session)
        with pytest.raises(grpc.RpcError) as caught:
            stream(client, SERIES[:1], {"session_id": session})
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert error_details(caught.value).reason == "SESSION_BUSY"

    assert len(list(client.forecast_stream(attach()))) == 1


def test_health_and_reflection_list_the_service(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="rnnlab.v1.Forecasting")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"rnnlab.v1.Forecasting", "rnnlab.v1.Generation"} <= names
    channel.close()


def test_without_forecast_bundles_the_service_is_not_listed():
    with ServerThread(config(committed("tiny"))) as plain:
        channel = grpc.insecure_channel(f"127.0.0.1:{plain.port}")
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="rnnlab.v1.Forecasting")
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()


def test_the_client_cli_forecasts_streams_exports_and_resumes(server, tmp_path, capsys, monkeypatch):
    target = ["--target", f"127.0.0.1:{server.port}"]
    csv = tmp_path / "s.csv"
    csv.write_text("t,x\n" + "".join(f"2026-01-{d + 1:02d},{SERIES[d][0]}\n" for d in range(12)))
    assert client_main([*target, "forecast", MODEL, "--csv", str(csv), "--time-column", "t"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert client_main([*target, "forecast", MODEL, "--csv", str(csv), "--stream", "--export"]) == 0
    *answers, token = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["observations"] for a in answers] == list(range(1, 13))
    assert answers[11]["steps"][0]["mean"] == pytest.approx(lines[0]["mean"], abs=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("t,x\n3,1.0\n2,2.0\n")
    assert client_main([*target, "forecast", MODEL, "--csv", str(bad), "--time-column", "t"]) == 1
    assert "history[1].time 2 is out of order: before the last time 3" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{SERIES[12][0]}\n"))  # one more row, from stdin
    assert client_main([*target, "forecast", MODEL, "--stream", "--resume", token["state_token"]]) == 0
    assert json.loads(capsys.readouterr().out)["observations"] == 13


def test_live_streams_are_bounded_by_the_session_store(models):
    """Two live streams fill a store of two sessions: a third is RESOURCE_EXHAUSTED; once one ends, a
    new stream goes through."""
    with ServerThread(config(models, max_sessions=2)) as small, Client(f"127.0.0.1:{small.port}") as c:
        release = threading.Event()

        def held():
            yield fpb.ForecastStreamRequest(model=MODEL, observations=observations(SERIES[:1]))
            release.wait(30)

        calls = [c.forecast_stream(held()) for _ in range(2)]
        assert [next(iter(call)).observations for call in calls] == [1, 1]
        with pytest.raises(grpc.RpcError) as caught:
            stream(c, SERIES[:1])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(caught.value).reason == "SESSIONS_EXHAUSTED"
        release.set()
        for call in calls:
            assert list(call) == []
        assert stream(c, SERIES[:1])[0].observations == 1


def test_kept_sessions_expire_by_the_periodic_sweep(models):
    """With no call touching the store, the server's sweep closes a kept session once its TTL is over."""
    with ServerThread(config(models, session_ttl_s=0.5)) as short, Client(f"127.0.0.1:{short.port}") as c:
        registry = short.server.metrics.registry
        [reply] = stream(c, SERIES[:1], {"model": MODEL, "keep_open": True})
        assert registry.get_sample_value("rnnlab_forecast_sessions") == 1
        deadline = time.monotonic() + 10
        while registry.get_sample_value("rnnlab_forecast_sessions") != 0:
            assert time.monotonic() < deadline, "the kept session was not swept"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as caught:
            stream(c, SERIES[1:2], {"session_id": reply.session_id})
        assert error_details(caught.value).reason == "SESSION_NOT_FOUND"
