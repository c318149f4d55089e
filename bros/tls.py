"""Credentials from files, shared by the services and the client: gRPC TLS (server side,
client side, mutual) and the Redis connection (password, TLS).

Every file is read once, when the process starts; a problem raises ValueError naming
the command-line flag it came from, so a misconfigured process fails at startup with a
message the operator can act on. A Kubernetes Secret mounted as files is read the same
way. The file contents (keys, passwords) never appear in a message.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import grpc


def read_file(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path!r}: {e.strerror or e}") from None
    if not data.strip():
        raise ValueError(f"{flag}: {path!r} is empty")
    return data


def check_pair(cert_file: str, key_file: str, cert_flag: str, key_flag: str) -> None:
    """A certificate needs its key and the other way round."""
    if bool(cert_file) != bool(key_file):
        have, missing = (cert_flag, key_flag) if cert_file else (key_flag, cert_flag)
        raise ValueError(f"{have} needs {missing}")


def _check_pem(cert_file: str, key_file: str, ca_file: str, flags: tuple[str, str, str]) -> None:
    """Parse what gRPC would only reject later with an unhelpful message (or at the first
    handshake): the certificate chain, its matching key, the CA bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert_file:
        try:
            # gRPC takes no key password; without this callback OpenSSL would prompt on the tty.
            ctx.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as e:
            raise ValueError(f"{flags[0]}/{flags[1]}: not a PEM certificate and its matching unencrypted key "
                             f"({e.reason or e})") from None
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as e:
            raise ValueError(f"{flags[2]}: not a PEM CA bundle ({e.reason or e})") from None


# ---- gRPC servers ---------------------------------------------------------------------------

def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "",
                       flags: tuple[str, str, str] = ("--tls-cert-file", "--tls-key-file", "--tls-client-ca-file"),
                       ) -> grpc.ServerCredentials | None:
    """TLS for a gRPC server, None for plaintext (no certificate). With a client CA every
    client must present a certificate signed by it (mutual TLS)."""
    check_pair(cert_file, key_file, flags[0], flags[1])
    if not cert_file:
        if client_ca_file:
            raise ValueError(f"{flags[2]} needs {flags[0]} and {flags[1]} (mutual TLS is TLS first)")
        return None
    cert, key = read_file(cert_file, flags[0]), read_file(key_file, flags[1])
    ca = read_file(client_ca_file, flags[2]) if client_ca_file else None
    _check_pem(cert_file, key_file, client_ca_file, flags)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def bind(server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on address, with TLS when there are credentials; returns the bound port."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


# ---- gRPC clients ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientTls:
    """TLS for a client channel. An empty ca_file trusts the system's roots; cert_file and
    key_file (both or neither) are the client's own certificate for mutual TLS."""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


def channel_credentials(tls: ClientTls | None,
                        flags: tuple[str, str, str] = ("--tls-ca-file", "--tls-cert-file", "--tls-key-file"),
                        ) -> grpc.ChannelCredentials | None:
    """Credentials for a TLS channel, or None for plaintext (tls is None)."""
    if tls is None:
        return None
    check_pair(tls.cert_file, tls.key_file, flags[1], flags[2])
    ca = read_file(tls.ca_file, flags[0]) if tls.ca_file else None
    cert = read_file(tls.cert_file, flags[1]) if tls.cert_file else None
    key = read_file(tls.key_file, flags[2]) if tls.key_file else None
    _check_pem(tls.cert_file, tls.key_file, tls.ca_file, (flags[1], flags[2], flags[0]))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel(target: str, credentials: grpc.ChannelCredentials | None, options=()) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def aio_channel(target: str, credentials: grpc.ChannelCredentials | None, options=()) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


# ---- Redis ----------------------------------------------------------------------------------

def redis_options(url: str, password_file: str = "", ca_file: str = "",
                  flags: tuple[str, str, str] = ("--redis-url", "--redis-password-file", "--redis-ca-file"),
                  ) -> dict:
    """Keyword arguments for redis.asyncio.from_url(url, **options).

    The password comes from password_file, else from the URL (redis://:pw@host); a file
    wins because a URL ends up in process listings and logs. rediss:// means TLS, the
    server verified against ca_file (or the system's roots) including its host name."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{flags[0]}: scheme must be redis://, rediss:// or unix://, got {scheme!r}")
    options: dict = {}
    if password_file:
        options["password"] = read_file(password_file, flags[1]).decode().rstrip("\r\n")
    if scheme == "rediss":
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if ca_file:
            read_file(ca_file, flags[2])
            _check_pem("", "", ca_file, ("", "", flags[2]))
            options["ssl_ca_certs"] = ca_file
    elif ca_file:
        raise ValueError(f"{flags[2]} needs a rediss:// {flags[0]} (TLS), got {scheme}://")
    return options


def redact_url(url: str) -> str:
    """url without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = unquote(parts.username or "")
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
