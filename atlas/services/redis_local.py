"""A local redis-server for tests and the demo: 127.0.0.1, its own directory, AOF on.

The server runs detached with a pid file in its directory, so a CLI can start it and another
process can stop it. Installing Redis is the set-up script's job (``dev/setup.sh``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AuthError, ConfigError, ServiceUnavailable
from atlas.services import _proc
from atlas.services._proc import (
    free_port,
    log_tail,
    one_line,
    pid_alive,
    pid_cmdline,
    port_in_use,
    read_pid_file,
    write_pid_file,
)

logger = logging.getLogger(__name__)

REDIS_HINT = "install it, e.g. apt-get install redis-server (or run make test, which does)"


@dataclass(frozen=True)
class RedisServer:
    """A running local redis-server."""

    url: str
    port: int
    pid: int
    directory: Path


def _pid_file(directory: Path) -> Path:
    return directory / "redis.pid.json"


def running(directory: Path) -> RedisServer | None:
    """The server recorded in ``directory`` if it still runs, else None."""
    record = read_pid_file(_pid_file(directory))
    if record is None:
        return None
    pid = int(record["pid"])
    if not (pid_alive(pid) and "redis-server" in pid_cmdline(pid)):
        _pid_file(directory).unlink(missing_ok=True)
        return None
    port = int(record["port"])
    return RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, pid=pid, directory=directory)


def ping(url: str, timeout_s: float = 2.0) -> bool:
    """Whether Redis at ``url`` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def is_auth_refusal(exc: BaseException) -> bool:
    """Whether a Redis error (or what caused it) is Redis refusing our password, not being down:
    permanent, so it is said at once instead of retried."""
    import redis

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, redis.AuthenticationError | redis.exceptions.AuthorizationError):
            return True
        if isinstance(seen, redis.ResponseError) and str(seen).startswith(
            ("NOAUTH", "WRONGPASS", "NOPERM")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_reachable(url: str, timeout_s: float = 3.0) -> None:
    """Raise a one-line error unless Redis at ``url`` answers PING: :class:`AuthError` when it
    refuses the password, :class:`ServiceUnavailable` when it does not answer. The URL is shown
    without its password."""
    import redis

    from atlas.settings import redact_url

    shown = redact_url(url)
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {shown!r}: {one_line(exc)}") from exc
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        if is_auth_refusal(exc):
            raise AuthError(f"Redis at {shown} refused the password") from exc
        raise ServiceUnavailable(f"Redis at {shown} is not reachable: {one_line(exc)}") from exc
    finally:
        client.close()


def start(
    directory: Path,
    port: int | None = None,
    *,
    timeout_s: float = 30.0,
    die_with_parent: bool = False,
    password: str | None = None,
) -> RedisServer:
    """Start redis-server on 127.0.0.1 (``port`` or a free one) with data and AOF in ``directory``.

    Returns the running server; if one already runs from this directory, returns that one.
    ``die_with_parent=True`` (tests) makes the server exit when the calling process dies.
    ``password`` makes it require one (``requirepass``; the URL returned carries it).
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    existing = running(directory)
    if existing is not None:
        return existing
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(f"redis-server not found: {REDIS_HINT}")
    port = port or free_port()
    if port_in_use(port):
        raise ConfigError(f"port 127.0.0.1:{port} is already in use: choose another Redis port")
    log = directory / "redis.log"
    command = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", str(log),
    ]  # fmt: skip
    if password:
        command += ["--requirepass", password]
    proc = subprocess.Popen(
        command,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_proc.die_with_parent() if die_with_parent else None,
    )
    write_pid_file(_pid_file(directory), {"pid": proc.pid, "port": port})
    userinfo = f":{password}@" if password else ""
    url = f"redis://{userinfo}127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            _pid_file(directory).unlink(missing_ok=True)
            tail = one_line(log_tail(log, 3))
            raise ConfigError(f"redis-server exited with code {code}: {tail}")
        if ping(url, timeout_s=1.0):
            logger.info("redis-server up on 127.0.0.1:%d (pid %d)", port, proc.pid)
            return RedisServer(url=url, port=port, pid=proc.pid, directory=directory)
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    _pid_file(directory).unlink(missing_ok=True)
    raise ServiceUnavailable(
        f"redis-server did not answer on 127.0.0.1:{port} within {timeout_s:.0f} s"
    )


def stop(directory: Path, *, timeout_s: float = 30.0) -> bool:
    """Stop the server started from ``directory`` (SIGTERM: Redis flushes the AOF and exits)."""
    server = running(Path(directory).resolve())
    if server is None:
        return False
    _proc.terminate(server.pid, timeout_s, kill_wait_s=5.0)
    _pid_file(server.directory).unlink(missing_ok=True)
    return True
