"""``rnnlab-client``: stream generations, chat in a session, list models, check health.

rnnlab-client --target 127.0.0.1:50151 generate tiny "The Time" --max-tokens 80 --temperature 0.8
rnnlab-client session tiny --prompt "The Time"     # each stdin line: appended, then a continuation
rnnlab-client models [NAME]
rnnlab-client health [--wait 30]
rnnlab-client --target 10.0.0.11:50151,10.0.0.12:50151 generate tiny "The Time"   # round_robin
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time

import grpc
from google.protobuf import json_format

from serving.api.rnnlab.v1 import generation_pb2 as pb
from serving.client import Client, error_details, sampling_options
from serving.errors import ExitCode, UsageError, fail, run_command
from serving.sampling import DEFAULT_SAMPLING
from serving.search import DEFAULT_SEARCH


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the server default")
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_SAMPLING.temperature,
        help=f"0: greedy (default {DEFAULT_SAMPLING.temperature}, as rnnlab-lm generate)",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k)
    parser.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnlab-client", description="Talk to an rnnlab-serve server.")
    parser.add_argument(
        "--target",
        action="append",
        help="host:port of the server (env RNNLAB_TARGET; default 127.0.0.1:50151); several replicas: "
        "comma-separated and/or the flag repeated, balanced round_robin with health checking; or a "
        "resolver name, e.g. dns:///rnnlab-replicas:50151 (a headless Kubernetes Service)",
    )
    parser.add_argument("--token", default=os.environ.get("RNNLAB_AUTH_TOKEN"), help="bearer token")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate")
    parser.add_argument("--timeout", type=float, help="deadline per call in seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="stream a continuation of a prompt")
    generate.add_argument("model")
    generate.add_argument("prompt")
    _sampling_args(generate)
    generate.add_argument("--stats", action="store_true", help="print finish reason and counts on stderr")
    session = commands.add_parser("session", help="interactive session: each stdin line, then a continuation")
    session.add_argument("model")
    session.add_argument("--prompt", default="")
    _sampling_args(session)
    session.add_argument("--export", action="store_true", help="print the state token (base64) at the end")
    models = commands.add_parser("models", help="list models, or show one as JSON")
    models.add_argument("name", nargs="?")
    health = commands.add_parser("health", help="print the server's health status")
    health.add_argument("--wait", type=float, default=0.0, help="retry until SERVING for this many seconds")
    _translate_args(commands)
    return parser


def _generate(client: Client, args: argparse.Namespace) -> int:
    end = None
    for message in client.generate(
        args.model,
        args.prompt,
        args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    ):
        sys.stdout.write(message.text)
        sys.stdout.flush()
        if message.HasField("end"):
            end = message.end
    sys.stdout.write("\n")
    if args.stats and end is not None:
        print(
            f"finish={pb.FinishReason.Name(end.finish_reason)} prompt_tokens={end.prompt_tokens} "
            f"generated_tokens={end.generated_tokens}",
            file=sys.stderr,
        )
    return 0


def _session(client: Client, args: argparse.Namespace) -> int:
    options = sampling_options(args.temperature, args.top_k, args.top_p, args.seed)

    def requests():
        yield pb.InteractRequest(open=pb.OpenSessionRequest(model=args.model, prompt=args.prompt))
        for line in sys.stdin:
            yield pb.InteractRequest(
                generate=pb.SessionGenerateRequest(
                    text=line, max_tokens=args.max_tokens, sampling=options, stop=args.stop
                )
            )
        if args.export:
            yield pb.InteractRequest(export=True)

    for reply in client.interact(requests()):
        event = reply.WhichOneof("event")
        if event == "generation":
            sys.stdout.write(reply.generation.text + ("\n" if reply.generation.HasField("end") else ""))
            sys.stdout.flush()
        elif event == "state":
            print(base64.b64encode(reply.state.token).decode("ascii"))
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(json_format.MessageToDict(client.model(args.name)), indent=2))
        return 0
    for info in client.models():
        print(
            f"{info.name}\t{info.cell} x{info.layers} h{info.hidden_size}\tvocab {info.vocab_size}\t"
            f"{info.tokenizer}\t{info.bundle_digest[:12]}"
        )
    return 0


def _translate_args(commands: argparse._SubParsersAction) -> None:
    translate = commands.add_parser("translate", help="translate sentences (arguments, or stdin lines)")
    translate.add_argument("model", nargs="?", help="translator name (omit with --list)")
    translate.add_argument("sentences", nargs="*", help="default: one sentence per stdin line")
    translate.add_argument("--list", action="store_true", help="list the server's translators")
    translate.add_argument("--beam", type=int, default=DEFAULT_SEARCH.beam)
    translate.add_argument("--n-best", type=int, default=1)
    translate.add_argument("--length-penalty", type=float, default=DEFAULT_SEARCH.length_penalty)
    translate.add_argument(
        "--max-length-ratio",
        "--max-len-ratio",
        dest="max_length_ratio",
        type=float,
        default=DEFAULT_SEARCH.max_len_ratio,
    )
    translate.add_argument("--json", action="store_true", help="one JSON result per line")


def _translate(client: Client, args: argparse.Namespace) -> int:
    if args.list or not args.model:
        for info in client.translators():
            print(
                f"{info.name}\t{info.source_language}->{info.target_language}\t"
                f"attention {'yes' if info.attention else 'no'}\t{info.bundle_digest[:12]}"
            )
        return 0
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin]
    results = client.translate(
        args.model,
        sentences,
        beam=args.beam,
        n_best=args.n_best,
        length_penalty=args.length_penalty,
        max_length_ratio=args.max_length_ratio,
    )
    failed = 0
    for number, result in enumerate(results, 1):
        if args.json:
            print(json.dumps(json_format.MessageToDict(result), ensure_ascii=False))
        elif result.failed:
            print()
        else:
            print(" ||| ".join(h.text for h in result.hypotheses))
        if result.failed:
            failed += 1
            print(f"sentence {number}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def _health(client: Client, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status = client.health(timeout=2.0)
        except grpc.RpcError:
            if time.monotonic() >= deadline:
                raise
            status = None
        if status == "SERVING" or time.monotonic() >= deadline:
            print(status)
            return 0 if status == "SERVING" else 1
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        targets = args.target or [os.environ.get("RNNLAB_TARGET", "127.0.0.1:50151")]
        # `health` asks the server itself, so a NOT_SERVING (draining) one must stay reachable
        with Client(
            targets,
            token=args.token,
            tls_ca=args.tls_ca,
            timeout=args.timeout,
            health_check=False if args.command == "health" else None,
        ) as client:
            return {
                "generate": _generate,
                "session": _session,
                "models": _models,
                "health": _health,
                "translate": _translate,
            }[args.command](client, args)
    except grpc.RpcError as exc:
        details = error_details(exc)
        reason = f" [{details.reason}]" if details.reason else ""
        retry = f" (retry after {details.retry_after_s:g} s)" if details.retry_after_s is not None else ""
        return fail(f"{exc.code().name}: {exc.details()}{reason}{retry}", ExitCode.SOME_FAILED)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
