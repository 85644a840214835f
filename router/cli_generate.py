"""``specfleet generate PROMPT``: one request to a running server, through the client SDK.

Where it sits: the command-line face of ``specfleet.client``; it imports nothing
heavier than grpc, so it starts instantly. Text goes to stdout (streamed with
``--stream``), a one-line summary to stderr; ``--json`` prints the typed result
instead (one JSON object, or one per chunk with ``--stream``).

Exit codes: 0 done; 1 the server failed the request; 2 the request was invalid;
3 no server reachable (or the deadline passed); 4 authentication failed; 130 ^C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_AUTH = 1, 2, 3, 4


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a completion from a running SpecFleet server",
        description="Send PROMPT to a SpecFleet server and print the completion.",
    )
    p.add_argument("prompt", help="prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message, rendered with the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message before the user's")
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="server address (default: 127.0.0.1:50051)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate at most (default: the server's default)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="top-k filtering")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus filtering")
    p.add_argument("--seed", type=int, default=None, help="RNG seed for sampled decoding")
    p.add_argument("--stop", nargs="+", default=None, metavar="S",
                   help="stop sequences (the output ends before the first match)")
    p.add_argument("--drafter", default=None, metavar="NAME", help="preferred drafter")
    p.add_argument("--no-speculation", action="store_true",
                   help="decode without drafts (same output, for comparison)")
    p.add_argument("--max-draft-length", type=int, default=None, metavar="N",
                   help="cap on the draft window")
    p.add_argument("--token", default=None, help="bearer token, when the server requires one")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this long")
    p.add_argument("--json", action="store_true", help="print the typed result as JSON")
    p.set_defaults(handler=_generate)


def exit_code(error) -> int:
    import grpc

    return {
        grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
        grpc.StatusCode.OUT_OF_RANGE: EXIT_INVALID,
        grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNREACHABLE,
        grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
        grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    }.get(error.code, EXIT_FAILED)


def _summary(finish_reason, usage, stats, seed=None) -> str:
    line = f"[finish={finish_reason} prompt={usage.prompt_tokens} completion={usage.completion_tokens}"
    if seed is not None:  # resend with --seed to reproduce
        line += f" seed={seed}"
    if stats.rounds:
        line += (f" accepted={stats.accepted}/{stats.drafted}"
                 f" mean_acceptance_length={stats.mean_acceptance_length:.2f}")
        if stats.drafters:
            line += " drafters=" + ",".join(sorted(stats.drafters))
    return line + "]"


def _generate(args) -> int:
    from specfleet.client import Client, SpecFleetError

    params = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop, drafter=args.drafter,
        speculate=not args.no_speculation, max_draft_length=args.max_draft_length,
        timeout=args.timeout,
    )
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    elif args.system:
        print("error: --system needs --chat", file=sys.stderr)
        return EXIT_INVALID
    partial_line = [False]  # streamed text is on stdout without its final newline
    try:
        with Client(args.server, token=args.token) as client:
            if args.stream:
                _print_stream(client.stream(prompt, **params), args.json, partial_line)
            else:
                result = client.generate(prompt, **params)
                if args.json:
                    print(json.dumps(dataclasses.asdict(result)))
                else:
                    print(result.text)
                    print(_summary(result.finish_reason, result.usage, result.stats, result.seed),
                          file=sys.stderr)
    except SpecFleetError as exc:
        if partial_line[0]:
            print(flush=True)  # end the partial line before the error
        print(f"error: {exc.code.name.lower()}: {exc.message} (server {args.server})",
              file=sys.stderr)
        return exit_code(exc)
    return 0


def _print_stream(chunks, as_json: bool, partial_line: list[bool]) -> None:
    for chunk in chunks:
        if as_json:
            print(json.dumps(dataclasses.asdict(chunk)), flush=True)
            continue
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        partial_line[0] = partial_line[0] or bool(chunk.text)
        if chunk.finish_reason is not None:
            print(flush=True)
            partial_line[0] = False
            print(_summary(chunk.finish_reason, chunk.usage, chunk.stats, chunk.seed), file=sys.stderr)
