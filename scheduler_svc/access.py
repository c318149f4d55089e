"""The scheduler's access settings, loaded once at startup: TLS for clients, mutual TLS
to the workers, bearer tokens, the Redis password and TLS (docs/reliability.md#access).

`load_access` reads every file the flags name and raises ValueError naming the flag;
`check_redis_credentials` turns a refused password (or an unverifiable Redis
certificate) into the same kind of startup error, while Redis merely being away is left
to the health watcher, which reports NOT_SERVING until it answers.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import grpc
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from bros import tls

from .auth import BearerTokenInterceptor
from .config import SchedulerConfig
from .tokens import parse_token_table

REDIS_CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Access:
    server_credentials: grpc.ServerCredentials | None     # None: clients connect in plaintext
    worker_credentials: grpc.ChannelCredentials | None    # None: plaintext to the workers
    redis_options: dict                                   # for redis.asyncio.from_url
    interceptors: tuple                                   # the token check, when there are tokens


def load_access(cfg: SchedulerConfig) -> Access:
    server = tls.server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
    worker_tls = None
    if cfg.worker_tls_ca_file or cfg.worker_tls_cert_file:
        worker_tls = tls.ClientTls(cfg.worker_tls_ca_file, cfg.worker_tls_cert_file, cfg.worker_tls_key_file)
    workers = tls.channel_credentials(worker_tls, ("--worker-tls-ca-file", "--worker-tls-cert-file",
                                                   "--worker-tls-key-file"))
    interceptors = ()
    if cfg.auth_tokens_file:
        text = tls.read_file(cfg.auth_tokens_file, "--auth-tokens-file").decode(errors="replace")
        interceptors = (BearerTokenInterceptor(parse_token_table(text, "--auth-tokens-file")),)
    redis = tls.redis_options(cfg.redis_url, cfg.redis_password_file, cfg.redis_ca_file)
    return Access(server, workers, redis, interceptors)


async def check_redis_credentials(client, cfg: SchedulerConfig) -> None:
    where = f"Redis at {tls.redact_url(cfg.redis_url)}"
    try:
        await asyncio.wait_for(client.ping(), REDIS_CHECK_TIMEOUT_S)
    except AuthenticationError as e:
        source = "--redis-password-file" if cfg.redis_password_file else "the password in --redis-url"
        raise ValueError(f"{where} refused the credentials ({source}): {e}") from None
    except (RedisConnectionError, OSError, asyncio.TimeoutError) as e:
        if _caused_by(e, ssl.SSLCertVerificationError):
            raise ValueError(f"{where}: its TLS certificate does not verify against "
                             f"{cfg.redis_ca_file or 'the system CA store'} (--redis-ca-file): {e}") from None
        # Away or not up yet: not a configuration error; health stays NOT_SERVING meanwhile.


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
