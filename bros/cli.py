"""The `bros` command: generate, submit, watch, abort, load (clients of a running scheduler)
and serve (the whole stack on this machine).

Exit codes: 0 ok, 1 the server (or a request, or a child process) failed, 2 bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

from bros import launcher
from bros.client import DEFAULT_MAX_TOKENS, DEFAULT_TARGET, BrosError, Chunk, Client, EventStream, Final
from bros.tls import ClientTls, read_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Arguments argparse accepted but that make no request (e.g. a bad token id list)."""


def default_target(environ: Mapping[str, str] = os.environ) -> str:
    """The one place the environment is read (with default_token)."""
    return environ.get("BROS_TARGET") or DEFAULT_TARGET


def default_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """$BROS_TOKEN, used when --token-file is not given."""
    return environ.get("BROS_TOKEN") or None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:
        try:
            return cmd_bench(args[1:])
        except SystemExit as e:  # the benchmark's argparse
            return e.code if isinstance(e.code, int) else EXIT_USAGE
    parser = build_parser(default_target(), default_token())
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse: 2 on bad usage, 0 after --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return ns.handler(ns)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"bros: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrosError as e:
        print(f"bros: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nbros: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# ---- arguments ---------------------------------------------------------------------------------

def build_parser(target: str, env_token: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bros", description="LLM serving for real-time and best-effort requests")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = connection_options(target, env_token)
    req = request_options()
    add = sub.add_parser
    add("generate", parents=[conn, req], help="run a request and stream its text"
        ).set_defaults(handler=cmd_generate)
    add("submit", parents=[conn, req], help="queue a request and print its id").set_defaults(handler=cmd_submit)
    p = add("watch", parents=[conn], help="stream (or, with --no-wait, print) a request's result by id")
    p.add_argument("request_id", metavar="ID")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="print what exists now and return")
    p.add_argument("--resume-from-index", type=int, metavar="N", help="only output tokens after index N")
    p.set_defaults(handler=cmd_watch)
    p = add("abort", parents=[conn], help="stop a request")
    p.add_argument("request_id", metavar="ID")
    p.set_defaults(handler=cmd_abort)
    add("load", parents=[conn], help="queues, workers and target attainment").set_defaults(handler=cmd_load)
    p = add("serve", help="run Redis, a worker and a scheduler on this machine until Ctrl-C")
    launcher.add_arguments(p)
    p.set_defaults(handler=cmd_serve)
    add("bench", help="replay a workload through every policy: bros bench --scenario NAME (see bros bench -h)")
    return parser


def cmd_bench(argv: list[str]) -> int:
    """The benchmark owns its flags (--scenario, --policies, --rates, ...): hand them over."""
    from scheduler_svc.bench.__main__ import main as bench_main
    bench_main(argv)
    return EXIT_OK


def connection_options(target: str, env_token: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--target", default=target, metavar="HOST:PORT",
                   help="scheduler address (default: $BROS_TARGET or %s; now %%(default)s)" % DEFAULT_TARGET)
    p.add_argument("--timeout", type=_positive(float), metavar="S", help="per-call deadline in seconds")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by the --tls-*-file options)")
    p.add_argument("--tls-ca-file", default="", metavar="PEM",
                   help="CA to verify the scheduler with (default: the system's roots)")
    p.add_argument("--tls-cert-file", default="", metavar="PEM", help="client certificate, for mutual TLS")
    p.add_argument("--tls-key-file", default="", metavar="PEM", help="the client certificate's key")
    p.add_argument("--token-file", default="", metavar="PATH", help="bearer token (default: $BROS_TOKEN)")
    p.set_defaults(env_token=env_token)  # never printed: --help shows no default for it
    return p


def connect(ns: argparse.Namespace) -> Client:
    """A Client for the connection options: TLS and token included."""
    use_tls = ns.tls or ns.tls_ca_file or ns.tls_cert_file or ns.tls_key_file
    tls = ClientTls(ns.tls_ca_file, ns.tls_cert_file, ns.tls_key_file) if use_tls else None
    try:
        token = read_file(ns.token_file, "--token-file").decode().strip() if ns.token_file else ns.env_token
        return Client(ns.target, timeout=ns.timeout, tls=tls, token=token)
    except ValueError as e:  # a file named by a flag is missing or malformed
        raise UsageError(str(e)) from None


def request_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--class", dest="service_class", choices=("rt", "be"), required=True,
                   help="rt: a person is waiting (latency targets); be: bulk work")
    p.add_argument("--ttft-ms", type=_non_negative(int), default=0, help="time-to-first-token target (rt)")
    p.add_argument("--tpot-ms", type=_non_negative(int), default=0, help="time-per-output-token target (rt)")
    p.add_argument("--max-tokens", type=_positive(int), default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=_non_negative(float), help="0 is greedy")
    p.add_argument("--top-p", type=_positive(float))
    p.add_argument("--top-k", type=_non_negative(int), default=0)
    p.add_argument("--seed", type=_non_negative(int))
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--request-id", default="", metavar="ID", help="default: a fresh id")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--chat", action="store_true", help="send PROMPT as one user chat message")
    kind.add_argument("--token-ids", action="store_true", help="PROMPT is token ids, e.g. '1 2 3' or '1,2,3'")
    p.add_argument("prompt", metavar="PROMPT")
    return p


def _non_negative(kind):
    return _bounded(kind, lambda v: v >= 0, "must be >= 0")


def _positive(kind):
    return _bounded(kind, lambda v: v > 0, "must be > 0")


def _bounded(kind, ok, rule):
    def parse(text: str):
        value = kind(text)  # argparse reports a ValueError here as "invalid <kind> value"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {rule}")
        return value
    parse.__name__ = kind.__name__
    return parse


def request_kwargs(ns: argparse.Namespace) -> dict:
    """Keyword arguments for Client.generate / Client.submit."""
    kwargs = dict(service_class=ns.service_class, ttft_ms=ns.ttft_ms, tpot_ms=ns.tpot_ms,
                  max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                  seed=ns.seed, stop=tuple(ns.stop), request_id=ns.request_id, chat=ns.chat)
    return {"prompt": parse_token_ids(ns.prompt) if ns.token_ids else ns.prompt, **kwargs}


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--token-ids: PROMPT must be integers, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise UsageError(f"--token-ids: PROMPT must be one or more non-negative integers, got {text!r}")
    return ids


# ---- commands ----------------------------------------------------------------------------------

def cmd_generate(ns) -> int:
    with connect(ns) as client:
        stream = client.generate(**request_kwargs(ns))
        return print_events(stream, show_targets=ns.service_class == "rt")


def cmd_submit(ns) -> int:
    with connect(ns) as client:
        print(client.submit(**request_kwargs(ns)))
    return EXIT_OK


def cmd_watch(ns) -> int:
    with connect(ns) as client:
        stream = client.watch(ns.request_id, wait=ns.wait, resume_from_index=ns.resume_from_index)
        return print_events(stream, show_targets=True)


def cmd_abort(ns) -> int:
    with connect(ns) as client:
        aborted = client.abort(ns.request_id)
    print(f"aborted {ns.request_id}" if aborted else f"{ns.request_id} had already finished")
    return EXIT_OK


def cmd_load(ns) -> int:
    with connect(ns) as client:
        print(format_load(client.load()))
    return EXIT_OK


def cmd_serve(ns) -> int:
    try:
        cfg = launcher.config_from_args(ns)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return launcher.serve(cfg)


# ---- output -------------------------------------------------------------------------------------

def print_events(stream: EventStream, show_targets: bool) -> int:
    """Text to stdout as it arrives, timings to stderr at the end."""
    final, ends_with_newline = None, True
    try:
        for event in stream:
            if isinstance(event, Chunk) and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                ends_with_newline = event.text.endswith("\n")
            elif isinstance(event, Final):
                final = event
    finally:
        stream.close()  # on Ctrl-C: cancel the call now, not at garbage collection
    if not ends_with_newline:
        sys.stdout.write("\n")
    if final is None:
        print(f"[{stream.request_id}] still running (the stream ended before the result)", file=sys.stderr)
        return EXIT_OK
    print(timings_line(final, stream.request_id, show_targets), file=sys.stderr)
    if final.error:
        print(f"bros: request {stream.request_id} failed: {final.error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def timings_line(f: Final, request_id: str, show_targets: bool) -> str:
    def met(ok: bool) -> str:
        return (" (met)" if ok else " (missed)") if show_targets else ""
    return (f"[{f.finish_reason}] {f.num_prompt_tokens} prompt + {f.num_output_tokens} output tokens; "
            f"queue {f.queue_ms:.1f} ms, TTFT {f.ttft_ms:.1f} ms{met(f.ttft_met)}, "
            f"TPOT {f.tpot_ms:.1f} ms{met(f.tpot_met)}; id {request_id}")


CLASS_COLUMNS = ("class", "queued", "queued tokens", "running", "recent finished", "TTFT attained",
                 "TPOT attained")
WORKER_COLUMNS = ("worker", "leased by", "up", "seqs", "step ms", "RT slots", "BE slots", "free slots",
                  "shared blocks", "BE on host", "RT avail", "RT avail+preempt", "BE avail")


def format_load(load: dict) -> str:
    """The LoadReport dict (Client.load) as two tables: per class, then per worker."""
    classes = [class_row(c) for c in load["classes"]]
    workers = [worker_row(w) for w in load["workers"]]
    return "\n\n".join([format_table(CLASS_COLUMNS, classes),
                        format_table(WORKER_COLUMNS, workers) if workers else "no workers"])


def class_row(c: dict) -> list[str]:
    def attained(fraction: float) -> str:
        return f"{100 * fraction:.1f}%" if c["recent_finished"] else "-"
    return [c["service_class"], str(c["queued_requests"]), str(c["queued_tokens"]), str(c["running_requests"]),
            str(c["recent_finished"]), attained(c["recent_ttft_attainment"]),
            attained(c["recent_tpot_attainment"])]


def worker_row(w: dict) -> list[str]:
    o = w["occupancy"]
    counts = ("rt_slots", "be_slots", "free_slots", "shared_blocks", "be_host_slots", "rt_available_slots",
              "rt_available_slots_with_preempt", "be_available_slots")
    return [w["worker_id"], w["leased_by"] or "-", "yes" if w["reachable"] else "no",
            str(w["running_sequences"]), f"{w['last_step_ms']:.1f}", *(str(o[k]) for k in counts)]


def format_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [list(headers), *rows]) for i in range(len(headers))]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(line(r) for r in [list(headers), *rows])


if __name__ == "__main__":
    sys.exit(main())
