"""The client library, the `bros` command and the launcher, without a scheduler: argument
parsing, request building, event conversion, resume and error mapping. Streams with breaks
are scripted callables standing in for a stub method; end-to-end tests run the real stack."""
import asyncio
import os
import signal
import socket
import sys
import time
import types
from contextlib import ExitStack

import grpc
import pytest

import bros.client
from bros import cli, launcher
from bros.client import (BrosError, Chunk, Client, EventStream, Final, RetryPolicy, build_request,
                         error_from_rpc, event_from_pb, message_to_dict, resumable_events, aresumable_events)
from bros.v1 import inference_pb2, types_pb2, worker_pb2

NO_WAIT = RetryPolicy(max_attempts=3, initial_backoff_s=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(*argv, target="127.0.0.1:50051"):
    return cli.build_parser(target).parse_args(list(argv))


# ---- argument parsing -------------------------------------------------------------------------

def test_generate_parses_every_option():
    ns = parse("generate", "--class", "rt", "--ttft-ms", "500", "--tpot-ms", "50", "--max-tokens", "9",
               "--temperature", "0", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--stop", "\n\n",
               "--stop", "END", "--request-id", "job-1", "--chat", "--target", "h:1", "--timeout", "2.5", "Hi")
    assert (ns.command, ns.service_class, ns.ttft_ms, ns.tpot_ms, ns.max_tokens) == ("generate", "rt", 500, 50, 9)
    assert (ns.temperature, ns.top_p, ns.top_k, ns.seed) == (0.0, 0.9, 40, 7)
    assert ns.stop == ["\n\n", "END"] and ns.request_id == "job-1" and ns.chat and not ns.token_ids
    assert (ns.target, ns.timeout, ns.prompt, ns.handler) == ("h:1", 2.5, "Hi", cli.cmd_generate)


def test_generate_defaults_leave_sampling_to_the_server():
    ns = parse("generate", "--class", "be", "Hi")
    kwargs = cli.request_kwargs(ns)
    assert kwargs == dict(prompt="Hi", service_class="be", ttft_ms=0, tpot_ms=0, max_tokens=256, temperature=None,
                          top_p=None, top_k=0, seed=None, stop=(), request_id="", chat=False)


def test_submit_takes_the_request_options():
    ns = parse("submit", "--class", "be", "--max-tokens", "3", "--token-ids", "1, 2 3")
    assert ns.handler is cli.cmd_submit
    assert cli.request_kwargs(ns)["prompt"] == [1, 2, 3]


def test_watch_abort_load_parse():
    ns = parse("watch", "abc", "--no-wait", "--resume-from-index", "4")
    assert (ns.request_id, ns.wait, ns.resume_from_index, ns.handler) == ("abc", False, 4, cli.cmd_watch)
    ns = parse("watch", "abc")
    assert (ns.wait, ns.resume_from_index) == (True, None)
    ns = parse("abort", "abc", "--target", "h:2")
    assert (ns.request_id, ns.target, ns.handler) == ("abc", "h:2", cli.cmd_abort)
    assert parse("load").handler is cli.cmd_load


def test_serve_parses_into_a_launch_config():
    ns = parse("serve", "--backend", "sim", "--model", "/m", "--worker-port", "0", "--worker-arg=--kv-cache-mb 64",
               "--worker-arg=--dtype=float16", "--port", "6000", "--policy", "bros", "--scheduler-arg",
               "--lease-ttl-ms 900", "--redis-url", "redis://h:1/0", "--run-dir", "/tmp/r", "--worker-timeout", "30")
    cfg = launcher.config_from_args(ns)
    assert cfg == launcher.LaunchConfig(
        redis_url="redis://h:1/0", backend="sim", model="/m", worker_port=0,
        worker_args=("--kv-cache-mb", "64", "--dtype=float16"), port=6000, policy="bros",
        scheduler_args=("--lease-ttl-ms", "900"), run_dir="/tmp/r", worker_timeout_s=30.0)
    assert launcher.config_from_args(parse("serve")) == launcher.LaunchConfig()


def test_target_defaults_to_the_environment():
    assert cli.default_target({}) == "127.0.0.1:50051"
    assert cli.default_target({"BROS_TARGET": "10.0.0.2:7000"}) == "10.0.0.2:7000"
    assert parse("load", target="10.0.0.2:7000").target == "10.0.0.2:7000"


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["generate", "Hi"], ["generate", "--class", "xx", "Hi"], ["generate", "--class", "rt"],
    ["generate", "--class", "rt", "--max-tokens", "0", "Hi"], ["generate", "--class", "rt", "--ttft-ms", "-1", "Hi"],
    ["generate", "--class", "rt", "--top-k", "many", "Hi"], ["generate", "--class", "rt", "--chat", "--token-ids", "1"],
    ["submit", "--class", "be", "--token-ids", "1 two"], ["submit", "--class", "be", "--token-ids", "1 -2"],
    ["watch"], ["abort"], ["abort", "a", "b"], ["load", "extra"], ["serve", "--backend", "gpu"],
    ["serve", "--worker-port", "70000"], ["serve", "--worker-timeout", "0"],
])
def test_bad_usage_exits_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


# ---- prompt -> GenerateRequest ----------------------------------------------------------------

def test_text_prompt():
    req = build_request("Hello", service_class="rt", ttft_ms=300, tpot_ms=40, max_tokens=5, request_id="r1")
    assert req.WhichOneof("prompt") == "text" and req.text == "Hello"
    assert (req.service_class, req.ttft_ms, req.tpot_ms, req.request_id) == (types_pb2.REALTIME, 300, 40, "r1")
    assert req.sampling.max_tokens == 5
    # Unset optionals stay unset: the server applies its documented defaults.
    for name in ("temperature", "top_p", "seed"):
        assert not req.sampling.HasField(name)
    assert not req.HasField("resume_from_index")


def test_text_with_chat_becomes_one_user_message():
    req = build_request("Hello", service_class="be", chat=True)
    assert req.WhichOneof("prompt") == "chat" and req.service_class == types_pb2.BEST_EFFORT
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "Hello")]


def test_chat_messages():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    req = build_request(msgs, service_class="rt")
    assert req.chat == worker_pb2.ChatList(messages=[worker_pb2.ChatMessage(role="system", content="Be brief."),
                                                     worker_pb2.ChatMessage(role="user", content="Hi")])


def test_token_ids_and_sampling():
    req = build_request([1, 2, 3], service_class="be", temperature=0.0, top_p=0.5, top_k=3, seed=11, stop="END",
                        stop_token_ids=[9], ignore_eos=True, resume_from_index=-1)
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [1, 2, 3]
    s = req.sampling
    assert s.HasField("temperature") and s.temperature == 0.0 and s.top_p == 0.5 and s.seed == 11
    assert (s.top_k, list(s.stop), list(s.stop_token_ids), s.ignore_eos) == (3, ["END"], [9], True)
    assert req.HasField("resume_from_index") and req.resume_from_index == -1


def test_request_id_is_generated_when_absent():
    a, b = (build_request("x", service_class="rt").request_id for _ in range(2))
    assert a != b and len(a) == 32 and all(c in "0123456789abcdef" for c in a)


@pytest.mark.parametrize("prompt, kwargs, error", [
    ("x", {"service_class": "realtime"}, ValueError),
    ([], {"service_class": "rt"}, ValueError),
    ([1, 2], {"service_class": "rt", "chat": True}, ValueError),
    ([True, 2], {"service_class": "rt"}, TypeError),
    ([1, "a"], {"service_class": "rt"}, TypeError),
])
def test_bad_prompts_fail_before_any_call(prompt, kwargs, error):
    with pytest.raises(error):
        build_request(prompt, **kwargs)


def test_cli_options_build_the_same_request():
    ns = parse("generate", "--class", "rt", "--ttft-ms", "200", "--seed", "3", "--stop", "x", "--request-id", "q",
               "--chat", "Hi")
    assert build_request(**cli.request_kwargs(ns)) == build_request(
        [{"role": "user", "content": "Hi"}], service_class="rt", ttft_ms=200, seed=3, stop=["x"], request_id="q")


# ---- GenerateResponse -> events --------------------------------------------------------------

def chunk_pb(index, ids, text=""):
    return inference_pb2.GenerateResponse(request_id="r", chunk=inference_pb2.TokenChunk(
        index=index, token_ids=ids, text=text))


def final_pb(**fields):
    return inference_pb2.GenerateResponse(request_id="r", final=inference_pb2.FinalResult(**fields))


def test_chunk_event():
    assert event_from_pb(chunk_pb(4, [7, 8], "ab")) == Chunk(index=4, token_ids=(7, 8), text="ab")


def test_final_event():
    pb = final_pb(finish_reason=types_pb2.LENGTH, num_prompt_tokens=12, num_output_tokens=5, queue_ms=1.5,
                  ttft_ms=80.0, tpot_ms=20.0, ttft_met=True, tpot_met=False, error="")
    assert event_from_pb(pb) == Final(finish_reason="length", num_prompt_tokens=12, num_output_tokens=5,
                                      queue_ms=1.5, ttft_ms=80.0, tpot_ms=20.0, ttft_met=True, tpot_met=False,
                                      error="")
    assert event_from_pb(final_pb(finish_reason=types_pb2.STOP)).finish_reason == "stop"
    assert event_from_pb(final_pb(finish_reason=types_pb2.ABORT, error="boom")).error == "boom"
    assert event_from_pb(final_pb()).finish_reason == "unspecified"


def test_unknown_response_kind_is_skipped():
    assert event_from_pb(inference_pb2.GenerateResponse(request_id="r")) is None


def test_load_report_as_plain_dict_and_table():
    report = inference_pb2.LoadReport(
        classes=[inference_pb2.ClassLoad(service_class=types_pb2.REALTIME, queued_requests=2, queued_tokens=2**40,
                                         running_requests=3, recent_finished=10, recent_ttft_attainment=0.9,
                                         recent_tpot_attainment=1.0),
                 inference_pb2.ClassLoad(service_class=types_pb2.BEST_EFFORT, queued_requests=7)],
        workers=[inference_pb2.WorkerLoad(worker_id="127.0.0.1:50061", leased_by="replica-1", reachable=True,
                                          occupancy=worker_pb2.PoolOccupancy(rt_slots=33, be_slots=44, free_slots=5),
                                          running_sequences=4, last_step_ms=21.25)])
    load = message_to_dict(report)
    assert load["classes"][0]["service_class"] == "rt" and load["classes"][1]["service_class"] == "be"
    assert load["classes"][0]["queued_tokens"] == 2**40  # an int, not JSON's string for uint64
    assert load["workers"][0]["occupancy"]["be_slots"] == 44
    table = cli.format_load(load)
    assert "90.0%" in table and "100.0%" in table and "21.2" in table and "replica-1" in table
    lines = table.splitlines()
    assert lines[2].split()[:3] == ["be", "7", "0"] and lines[2].split()[-2:] == ["-", "-"]
    assert cli.format_load({"classes": [], "workers": []}).endswith("no workers")


# ---- errors -----------------------------------------------------------------------------------

class RpcFailure(grpc.RpcError):
    """What a stub raises: an RpcError with a status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_error_mapping():
    err = error_from_rpc(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]"))
    assert (err.code, err.message, err.transient) == ("INVALID_ARGUMENT", "sampling.top_p: must be in (0, 1]", False)
    assert str(err) == "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]"
    assert error_from_rpc(RpcFailure(grpc.StatusCode.UNAVAILABLE, "down")).transient
    assert error_from_rpc(RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED)).transient is False


def test_unreachable_server_is_unavailable():
    with Client(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as client:
        with pytest.raises(BrosError) as e:
            client.load()
    assert e.value.code == "UNAVAILABLE" and e.value.message


def test_cli_reports_server_errors_with_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(bros.client, "time", types.SimpleNamespace(sleep=lambda s: None))
    target = f"127.0.0.1:{free_port()}"
    for argv in (["load"], ["abort", "x"], ["generate", "--class", "rt", "Hi"], ["watch", "x"]):
        assert cli.main([*argv, "--target", target]) == 1
        assert "bros: UNAVAILABLE: " in capsys.readouterr().err


# ---- resume -----------------------------------------------------------------------------------

class ScriptedCall:
    """A stream call: yields its responses, then raises `error` if given."""

    def __init__(self, responses, error=None):
        self.responses, self.error, self.cancelled = responses, error, False

    def __iter__(self):
        yield from self.responses
        if self.error is not None:
            raise self.error

    async def _aiter(self):
        for r in self:
            yield r

    def __aiter__(self):
        return self._aiter()

    def cancel(self):
        self.cancelled = True


class ScriptedRpc:
    """A stub method returning one scripted call per invocation, recording each request."""

    def __init__(self, *calls):
        self.calls, self.requests = list(calls), []

    def __call__(self, request, timeout=None):
        self.requests.append(request)
        return self.calls.pop(0)


def unavailable():
    return RpcFailure(grpc.StatusCode.UNAVAILABLE, "replica went away")


def broken_then_resumed():
    # The second replica replays index 2 (already delivered): the client drops it.
    return ScriptedRpc(ScriptedCall([chunk_pb(0, [10, 11], "ab"), chunk_pb(2, [12], "c")], unavailable()),
                       ScriptedCall([], unavailable()),
                       ScriptedCall([chunk_pb(2, [12], "c"), chunk_pb(3, [13], "d"), final_pb(num_output_tokens=4)]))


def test_resume_delivers_every_token_exactly_once():
    rpc = broken_then_resumed()
    req = build_request("Hi", service_class="rt", request_id="r")
    events = list(resumable_events(rpc, req, timeout=None, retry=NO_WAIT, resume=True))
    assert [e.token_ids for e in events if isinstance(e, Chunk)] == [(10, 11), (12,), (13,)]
    assert isinstance(events[-1], Final) and events[-1].num_output_tokens == 4
    assert [r.request_id for r in rpc.requests] == ["r"] * 3
    assert not rpc.requests[0].HasField("resume_from_index")
    assert [r.resume_from_index for r in rpc.requests[1:]] == [2, 2]


def test_async_resume_delivers_every_token_exactly_once():
    async def collect():
        req = build_request("Hi", service_class="rt", request_id="r")
        return [e async for e in aresumable_events(broken_then_resumed(), req, timeout=None, retry=NO_WAIT,
                                                    resume=True)]
    events = asyncio.run(collect())
    assert [e.index for e in events if isinstance(e, Chunk)] == [0, 2, 3] and isinstance(events[-1], Final)


def test_resume_continues_after_the_callers_index():
    rpc = ScriptedRpc(ScriptedCall([chunk_pb(5, [1])], unavailable()), ScriptedCall([final_pb()]))
    req = build_request("Hi", service_class="rt", request_id="r", resume_from_index=4)
    list(resumable_events(rpc, req, timeout=None, retry=NO_WAIT, resume=True))
    assert [r.resume_from_index for r in rpc.requests] == [4, 5]


def test_watch_requests_resume_too():
    rpc = ScriptedRpc(ScriptedCall([chunk_pb(0, [1])], unavailable()), ScriptedCall([final_pb()]))
    req = inference_pb2.WatchRequest(request_id="r", wait=True)
    list(resumable_events(rpc, req, timeout=None, retry=NO_WAIT, resume=True))
    assert rpc.requests[1] == inference_pb2.WatchRequest(request_id="r", wait=True, resume_from_index=0)


def test_retries_are_bounded_without_progress():
    rpc = ScriptedRpc(*(ScriptedCall([], unavailable()) for _ in range(3)))
    with pytest.raises(BrosError) as e:
        list(resumable_events(rpc, build_request("Hi", service_class="rt"), timeout=None, retry=NO_WAIT, resume=True))
    assert e.value.code == "UNAVAILABLE" and len(rpc.requests) == 3


@pytest.mark.parametrize("error, resume", [(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "bad"), True),
                                           (RpcFailure(grpc.StatusCode.UNAVAILABLE, "down"), False)])
def test_no_retry_for_permanent_errors_or_without_resume(error, resume):
    rpc = ScriptedRpc(ScriptedCall([], error), ScriptedCall([final_pb()]))
    with pytest.raises(BrosError):
        list(resumable_events(rpc, build_request("Hi", service_class="rt"), timeout=None, retry=NO_WAIT,
                              resume=resume))
    assert len(rpc.requests) == 1


def test_backoff_grows_to_its_cap_and_restarts_on_progress():
    backoff = RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5).start()
    assert [backoff.next_delay() for _ in range(6)] == [0.1, 0.2, 0.4, 0.5, 0.5, None]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_stopping_early_cancels_the_call():
    call = ScriptedCall([chunk_pb(0, [1]), chunk_pb(1, [2])])
    stream = EventStream("r", resumable_events(ScriptedRpc(call), build_request("Hi", service_class="rt"),
                                               timeout=None, retry=NO_WAIT, resume=True))
    next(stream)
    stream.close()
    assert call.cancelled


def test_stopping_before_the_final_abandons_the_request_and_only_then():
    """on_abandon (the client's Abort) runs when the caller stops before the final, not
    after it, not when the stream ends by itself, and not when it fails."""
    def run(calls, read, close=True):
        abandoned = []
        events = resumable_events(ScriptedRpc(*calls), build_request("Hi", service_class="rt"), timeout=None,
                                  retry=NO_WAIT, resume=True, on_abandon=lambda: abandoned.append(True))
        stream = EventStream("r", events)
        for _ in range(read):
            next(stream)
        if close:
            stream.close()
        return bool(abandoned)

    two = [chunk_pb(0, [1]), chunk_pb(1, [2]), final_pb(finish_reason=types_pb2.LENGTH)]
    assert run([ScriptedCall(two)], read=1)
    assert run([ScriptedCall(two[:1], unavailable()), ScriptedCall(two[1:])], read=2)  # after a resume too
    assert not run([ScriptedCall(two)], read=3)             # the final arrived: nothing to abort
    assert not run([ScriptedCall(two)], read=0)             # never started: no call was made
    events = resumable_events(ScriptedRpc(ScriptedCall([], RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "no"))),
                              build_request("Hi", service_class="rt"), timeout=None, retry=NO_WAIT, resume=True,
                              on_abandon=lambda: pytest.fail("a failed stream is not abandoned"))
    with pytest.raises(BrosError):
        list(events)


def test_the_async_stream_abandons_too():
    abandoned = []

    async def on_abandon():
        abandoned.append(True)

    async def main():
        events = aresumable_events(ScriptedRpc(ScriptedCall([chunk_pb(0, [1]), chunk_pb(1, [2])])),
                                   build_request("Hi", service_class="rt"), timeout=None, retry=NO_WAIT,
                                   resume=True, on_abandon=on_abandon)
        await anext(events)
        await events.aclose()
    asyncio.run(main())
    assert abandoned == [True]


# ---- CLI output --------------------------------------------------------------------------------

def events_stream(*events):
    return EventStream("r1", (e for e in events))


def test_print_events_streams_text_then_timings(capsys):
    final = Final("stop", 3, 2, 1.25, 80.0, 20.0, True, False, "")
    assert cli.print_events(events_stream(Chunk(0, (1,), "Hel"), Chunk(1, (2,), "lo"), final), True) == 0
    out, err = capsys.readouterr()
    assert out == "Hello\n"
    assert err.strip() == ("[stop] 3 prompt + 2 output tokens; queue 1.2 ms, TTFT 80.0 ms (met), "
                           "TPOT 20.0 ms (missed); id r1")


def test_print_events_failed_request_exits_1(capsys):
    final = Final("abort", 3, 0, 0.0, 0.0, 0.0, False, False, "could not be scheduled")
    assert cli.print_events(events_stream(final), False) == 1
    err = capsys.readouterr().err
    assert "(met)" not in err and "could not be scheduled" in err


def test_print_events_without_final_says_still_running(capsys):
    assert cli.print_events(events_stream(Chunk(0, (1,), "a\n")), True) == 0
    out, err = capsys.readouterr()
    assert out == "a\n" and "still running" in err


# ---- launcher ---------------------------------------------------------------------------------

def test_child_commands():
    cfg = launcher.LaunchConfig(backend="sim", model="/m", worker_args=("--dtype", "float16"), policy="bros",
                                scheduler_args=("--lease-ttl-ms", "900"))
    # Children drain within the launcher's grace (15 s) less a margin.
    assert launcher.worker_argv(cfg, 50061)[1:] == ["-m", "worker_svc", "--backend", "sim", "--port", "50061",
                                                    "--drain-grace-s", "13.0", "--model", "/m", "--dtype", "float16"]
    assert launcher.scheduler_argv(cfg, 50051, "redis://h:1/0", "127.0.0.1:50061")[1:] == [
        "-m", "scheduler_svc", "--port", "50051", "--redis-url", "redis://h:1/0", "--workers", "127.0.0.1:50061",
        "--drain-grace-s", "13.0", "--policy", "bros", "--lease-ttl-ms", "900"]
    assert "--target" not in launcher.ready_message(50051)
    assert "--target 127.0.0.1:6000" in launcher.ready_message(6000)


def test_busy_port_is_refused_and_zero_picks_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="--worker-port"):
            launcher.resolve_port(s.getsockname()[1], "--worker-port")
    assert launcher.resolve_port(0, "--port") > 0


def test_child_dying_at_start_reports_its_output(tmp_path):
    with ExitStack() as stack:
        child = launcher.start_child(stack, "worker", [sys.executable, "-c", "print('no model here'); exit(3)"],
                                     tmp_path, grace_s=1)
        with pytest.raises(launcher.ChildFailed, match="exited with code 3") as e:
            launcher.wait_serving(child, f"127.0.0.1:{free_port()}", launcher.WORKER_SERVICE, timeout_s=30)
    assert e.value.details == ["no model here"] and str(tmp_path / "worker.log") in str(e.value)


def test_real_sim_worker_becomes_serving_and_stops(tmp_path):
    port = free_port()
    cfg = launcher.LaunchConfig(backend="sim")
    with ExitStack() as stack:
        child = launcher.start_child(stack, "worker", launcher.worker_argv(cfg, port), tmp_path, grace_s=10)
        launcher.wait_serving(child, f"127.0.0.1:{port}", launcher.WORKER_SERVICE, timeout_s=120)
    assert child.proc.returncode == 0  # stopped by SIGTERM, cleanly
    assert (tmp_path / "worker.log").read_text()


def test_first_signal_raises_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(launcher.Stop, match="SIGTERM"):
        with launcher.stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler's exception interrupts this at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_bench_verb_hands_its_flags_to_the_benchmark(capsys):
    from bros.cli import main
    assert main(["bench", "--scenario", "no-such-scenario"]) == 2
    assert "invalid choice" in capsys.readouterr().err
