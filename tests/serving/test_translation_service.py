"""The Translation service on a real server (127.0.0.1, port 0): results, errors, streams, shared batches."""

import asyncio
import json
import logging
import shutil
import struct
import threading

import grpc
import pytest

from serving.api.rnnlab.v1 import translation_pb2 as tpb
from serving.bundle import write_manifest
from serving.client import Client
from serving.client_cli import main as client_main
from serving.config import ServerConfig
from serving.harness import ServerThread
from serving.metrics import TranslationMetrics
from serving.sentence_batcher import SentenceBatcher
from serving.translator import SearchParams, Seq2SeqRuntime
from tests.committed_bundles import TRANSLATOR, committed
from tests.tiny_translators import tiny_sources

NAME = "tiny-mt"


@pytest.fixture(scope="module")
def bundle():
    return committed(TRANSLATOR)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """A good translator, one with a flipped byte, one whose graph onnxruntime cannot read (sums fine)."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(bundle, models / NAME)
    shutil.copytree(bundle, models / "flipped")
    graph = models / "flipped" / "encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    shutil.copytree(bundle, models / "garbled")
    (models / "garbled" / "decoder_step.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((models / "garbled" / "manifest.json").read_text())
    manifest["name"] = "garbled"
    for key in ("format", "format_version", "files", "file_sizes"):
        del manifest[key]
    write_manifest(models / "garbled", manifest)
    with ServerThread(ServerConfig(models=str(models), port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def test_only_good_bundles_are_served(client):
    [info] = client.translators()
    assert info.name == NAME and info.source_language == "en" and info.target_language == "fr"
    assert info.attention and info.target_vocab_size > 100 and len(info.bundle_digest) == 64


def test_translate_gives_the_local_translators_results(client, bundle):
    texts = tiny_sources(12, start=200)
    results = client.translate(NAME, texts, beam=4, n_best=2, length_penalty=0.6)
    local = Seq2SeqRuntime.load(bundle).translate(texts, SearchParams(beam=4, n_best=2))
    assert len(results) == len(texts)
    for remote, mine in zip(results, local, strict=True):
        assert [h.text for h in remote.hypotheses] == [t for t, _ in mine.n_best]
        assert list(remote.hypotheses[0].token_ids) == list(mine.hypotheses[0].tokens)
        assert remote.hypotheses[0].score == pytest.approx(mine.n_best[0][1], abs=1e-4)
        assert remote.source_tokens == mine.source_tokens and not remote.failed


def test_bad_sentences_fail_alone(client):
    results = client.translate(NAME, ["Hello.", "", "word " * 300, "Go."], beam=2)
    assert [r.failed for r in results] == [False, True, True, False]
    assert results[1].error == "empty line" and results[2].error.startswith("too long")
    assert results[3].hypotheses and not results[1].hypotheses


@pytest.mark.parametrize(
    ("model", "options", "code"),
    [
        ("nope", {}, grpc.StatusCode.NOT_FOUND),
        (NAME, {"beam": 99}, grpc.StatusCode.INVALID_ARGUMENT),
        (NAME, {"beam": 2, "n_best": 3}, grpc.StatusCode.INVALID_ARGUMENT),
        (NAME, {"max_length_ratio": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
        (NAME, {"max_length": 5000}, grpc.StatusCode.INVALID_ARGUMENT),
        ("flipped", {}, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_status_codes(client, model, options, code):
    with pytest.raises(grpc.RpcError) as error:
        client.translate(model, ["Hello."], **options)
    assert error.value.code() == code


def test_too_many_sentences_is_resource_exhausted(client):
    with pytest.raises(grpc.RpcError) as error:
        client.translate(NAME, [""] * (ServerConfig().translate_max_sentences + 1))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_translate_stream_answers_every_item_once(client):
    texts = [*tiny_sources(25, start=250), ""]
    options = tpb.TranslateOptions(beam_size=3, length_penalty=0.6)
    requests = [
        tpb.TranslateStreamRequest(
            id=f"s{i}", sentence=t, model=NAME if i == 0 else "", options=options if i == 0 else None
        )
        for i, t in enumerate(texts)
    ]
    answers = {r.id: r.result for r in client.translate_stream(requests)}
    assert sorted(answers) == sorted(f"s{i}" for i in range(len(texts)))
    unary = client.translate(NAME, texts, beam=3, length_penalty=0.6)

    def best(result):
        return result.error if result.failed else result.hypotheses[0].text

    assert [best(answers[f"s{i}"]) for i in range(len(texts))] == [best(r) for r in unary]
    with pytest.raises(grpc.RpcError) as error:
        list(client.translate_stream([tpb.TranslateStreamRequest(id="x", sentence="Hi.", model="nope")]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_calls_share_encoder_batches(server, client):
    """Eight clients at once: at least one encoder call holds sentences of two or more calls."""
    registry = server.app.metrics.registry

    def shared():
        return registry.get_sample_value("rnnlab_translation_shared_batches_total", {"model": NAME}) or 0.0

    before = shared()
    for _ in range(5):
        barrier = threading.Barrier(8)
        results = []

        def call(index, barrier=barrier, results=results):
            barrier.wait()
            results.append(client.translate(NAME, tiny_sources(3, start=10 * index), beam=1))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 8 and all(len(r) == 3 for r in results)
        if shared() > before:
            break
    assert shared() > before


def test_client_cli_translate(server, capsys):
    target = f"127.0.0.1:{server.port}"
    assert client_main(["--target", target, "translate", NAME, "Hello.", "I am cold.", "--beam", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(out)
    assert client_main(["--target", target, "translate", "--list"]) == 0
    assert capsys.readouterr().out.startswith(f"{NAME}\ten->fr")
    assert client_main(["--target", target, "translate", NAME, "", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["failed"] is True and "sentence 1: empty line" in captured.err


def test_garbled_bundle_is_refused_with_a_log_line(bundle, tmp_path, caplog):
    from serving.registry import load_bundles

    garbled = tmp_path / "garbled"
    shutil.copytree(bundle, garbled)
    (garbled / "encoder.onnx").write_bytes(b"garbage")
    manifest = json.loads((garbled / "manifest.json").read_text())
    for key in ("format", "format_version", "files", "file_sizes"):
        del manifest[key]
    write_manifest(garbled, manifest)
    shutil.copytree(bundle, tmp_path / NAME)
    with caplog.at_level(logging.WARNING, logger="rnnlab.serve"):
        loaded = load_bundles(tmp_path)
    assert list(loaded["seq2seq"]) == [NAME]
    assert "refusing bundle garbled" in caplog.text and "encoder.onnx" in caplog.text


def test_a_deadline_ends_the_call_and_the_server_goes_on(client):
    with pytest.raises(grpc.RpcError) as error:
        client.translate(NAME, tiny_sources(300), beam=8, timeout=0.01)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not client.translate(NAME, ["Hello."])[0].failed


class CountingBatcher(SentenceBatcher):
    """Records how many batches were being searched at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = self.most_active = 0
        self.sizes = []
        self.lock = threading.Lock()

    def _search(self, batch):
        with self.lock:
            self.sizes.append(len(batch))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            return super()._search(batch)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_search_batches_at_once_with_the_same_results(bundle, workers):
    runtime = Seq2SeqRuntime.load(bundle)
    texts = tiny_sources(40, start=500)
    sources = [runtime.encode_source(t)[0] for t in texts]
    params = SearchParams(beam=4)

    async def translate_all():
        batcher = CountingBatcher(
            NAME, runtime, TranslationMetrics(), gather_ms=0.0, batch_tokens=40, workers=workers
        )
        futures = [batcher.submit(ids, params, call=i) for i, ids in enumerate(sources)]
        results = await asyncio.gather(*futures)
        return batcher, results

    batcher, results = asyncio.run(translate_all())
    assert batcher.most_active == workers and batcher.active == 0
    local = runtime.translate(texts, params)
    assert [list(hyps) for hyps in results] == [list(t.hypotheses) for t in local]
    with pytest.raises(ValueError, match="workers"):
        SentenceBatcher(NAME, runtime, TranslationMetrics(), workers=0)


@pytest.mark.parametrize(("workers", "sizes"), [(1, [9]), (2, [5, 4]), (3, [3, 3, 3])])
def test_a_short_queue_is_shared_out_among_idle_workers(bundle, workers, sizes):
    runtime = Seq2SeqRuntime.load(bundle)
    sources = [runtime.encode_source(t)[0] for t in tiny_sources(9, start=560)]

    async def translate_all():
        batcher = CountingBatcher(NAME, runtime, TranslationMetrics(), gather_ms=0.0, workers=workers)
        await asyncio.gather(*[batcher.submit(ids, SearchParams(beam=2), call=1) for ids in sources])
        return batcher

    batcher = asyncio.run(translate_all())
    assert batcher.sizes == sizes


def test_unset_length_penalty_is_the_product_default_and_an_explicit_zero_switches_it_off():
    from serving.search import DEFAULT_SEARCH
    from serving.translation_service import search_params

    assert search_params(tpb.TranslateOptions(), ServerConfig()) == DEFAULT_SEARCH
    off = tpb.TranslateOptions.FromString(tpb.TranslateOptions(length_penalty=0.0).SerializeToString())
    assert off.HasField("length_penalty") and search_params(off, ServerConfig()).length_penalty == 0.0
    # Wire compatible: a value set by a client built before the field was optional reads the same.
    old_wire = b"\x25" + struct.pack("<f", 0.3)  # field 4, fixed32
    assert search_params(tpb.TranslateOptions.FromString(old_wire), ServerConfig()).length_penalty == 0.3
