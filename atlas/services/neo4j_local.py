"""A real Neo4j Community 5.26 server on this machine, without Docker.

The launcher (``tools/neo4j-launcher``: a pom and one Java class) runs Neo4j embedded with only
a Bolt connector on 127.0.0.1, auth off, a bounded heap and page cache, and a clean shutdown on
SIGTERM. It is built with Maven on first use (thin jar + ``target/lib`` from
``copy-dependencies``) and cached under ``{atlas_home}/launcher/<hash of pom + sources>``, so
later starts skip Maven entirely.

Layout of a launcher home (``settings.local_neo4j_home`` by default)::

    <home>/data/            the store (persists across restarts)
    <home>/logs/launcher.log  the JVM's stdout/stderr; Neo4j's own debug.log sits next to it
    <home>/conf/neo4j.conf  extra settings handed to the launcher (rewritten on each start)
    <home>/neo4j.pid        JSON {pid, port, uri, ...} of the running launcher

Public API: :func:`start`, :func:`stop`, :func:`status`, :func:`build_launcher`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import ConfigError, ServiceUnavailable
from atlas.services import _proc
from atlas.services._proc import (
    file_lock,
    log_tail,
    one_line,
    pid_alive,
    pid_cmdline,
    port_in_use,
    read_pid_file,
    write_pid_file,
)

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings

logger = logging.getLogger(__name__)

MAIN_CLASS = "org.circuitatlas.launcher.Launcher"
JAVA_HINT = "install a Java 17 runtime, e.g. apt-get install openjdk-17-jre-headless"
MAVEN_HINT = "install Maven (needed once to build the launcher), e.g. apt-get install maven"
EXIT_LOCKED = 3
EXIT_PORT = 4
_ADD_OPENS = (
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
)
#: Extra neo4j.conf settings written on every start.
_EXTRA_CONF = {
    # keep transaction logs bounded on a laptop-sized disk
    "db.tx_log.rotation.retention_policy": "512M size",
    # cap the memory of one transaction (a runaway query fails instead of exhausting the heap)
    "db.memory.transaction.max": "512m",
    # no phoning home (these machines are offline anyway)
    "dbms.usage_report.enabled": "false",
    # Bolt's netty loops otherwise idle 5 s each on shutdown (pinned to Neo4j 5.26)
    "internal.dbms.bolt.netty_server_shutdown_quiet_period": "0",
    "internal.dbms.bolt.netty_server_shutdown_timeout": "3s",
}

Progress = Callable[[str], None]


class LauncherAlreadyRunning(ConfigError):
    """A launcher already runs on this store; a second one is refused."""

    def __init__(self, message: str, uri: str, pid: int) -> None:
        super().__init__(message)
        self.uri = uri
        self.pid = pid


@dataclass(frozen=True)
class LocalNeo4j:
    """Where and how the local launcher runs.

    Attributes:
        home: launcher home (data, logs, conf, pid file).
        port: Bolt port on 127.0.0.1.
        heap: JVM max heap (``-Xmx``), e.g. ``"1g"``.
        pagecache: Neo4j page cache size, e.g. ``"1g"``.
        build_root: where launcher builds are cached (one sub-directory per source hash).
    """

    home: Path
    port: int
    heap: str = "1g"
    pagecache: str = "1g"
    build_root: Path | None = None

    @classmethod
    def from_settings(cls, settings: AtlasSettings) -> LocalNeo4j:
        """The launcher that the settings describe (``settings.local_neo4j_home`` etc.)."""
        return cls(
            home=settings.local_neo4j_home,
            port=settings.neo4j_bolt_port,
            heap=settings.neo4j_heap,
            pagecache=settings.neo4j_pagecache,
            build_root=settings.atlas_home / "launcher",
        )

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "neo4j.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "launcher.log"

    @property
    def resolved_build_root(self) -> Path:
        return self.build_root or (self.home.parent / "launcher")


@dataclass(frozen=True)
class Neo4jStatus:
    """What :func:`status` found: a live launcher process and whether Bolt answers."""

    running: bool
    answers: bool
    uri: str
    pid: int | None
    home: Path

    def describe(self) -> str:
        """One line for humans."""
        if not self.running:
            return f"local Neo4j is not running (home {self.home})"
        state = "answers" if self.answers else "does not answer yet"
        return f"local Neo4j runs at {self.uri} (pid {self.pid}) and {state}"


# --------------------------------------------------------------------------- build


def launcher_source_dir() -> Path:
    """The Maven project of the launcher (``tools/neo4j-launcher`` in the repository)."""
    root = Path(__file__).resolve().parents[2]
    source = root / "tools" / "neo4j-launcher"
    if not (source / "pom.xml").is_file():
        raise ConfigError(
            f"launcher sources not found at {source}: run from a checkout of the repository "
            "(pip install -e .) or set NEO4J_URI to an existing Neo4j"
        )
    return source


def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    files = [source / "pom.xml", *sorted((source / "src").rglob("*"))]
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(source).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(java_home) / "bin" / "java")] if java_home else []
    found = shutil.which("java")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            _check_java_version(candidate)
            return candidate
    raise ConfigError(f"Java not found: {JAVA_HINT}")


def _check_java_version(java: str) -> None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"Java at {java} does not run ({one_line(exc)}): {JAVA_HINT}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return  # unknown format: let the JVM itself complain later
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < 17:
        raise ConfigError(f"Java {major} at {java} is too old for Neo4j 5.26: {JAVA_HINT}")


def build_launcher(
    build_root: Path, *, progress: Progress | None = None, force: bool = False
) -> list[Path]:
    """Build the launcher with Maven unless a build of the same sources is cached.

    Returns the class path entries (the thin jar and ``lib/*``). Safe to call concurrently from
    several processes: builds are serialised with a file lock and published atomically.
    """
    source = launcher_source_dir()
    key = _source_hash(source)
    target = build_root / key
    classpath = [target / "neo4j-launcher.jar", target / "lib" / "*"]
    if not force and (target / "READY").is_file():
        return classpath
    with file_lock(build_root / ".build.lock"):
        if not force and (target / "READY").is_file():
            return classpath
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ConfigError(f"Maven not found: {MAVEN_HINT}")
        _find_java()
        message = f"building the Neo4j launcher with Maven (first use only) into {target} ..."
        logger.info(message)
        if progress:
            progress(message)
        work = build_root / f".work-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copy2(source / "pom.xml", work / "pom.xml")
        shutil.copytree(source / "src", work / "src")
        log = build_root / f"build-{key}.log"
        started = time.monotonic()
        with log.open("w") as handle:
            result = subprocess.run(
                [mvn, "-q", "-B", "-Dstyle.color=never", "package"],
                cwd=work,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        if result.returncode != 0:
            raise ConfigError(
                f"building the Neo4j launcher with Maven failed (exit {result.returncode}); "
                f"see {log}"
            )
        built = work / "target"
        if not (built / "neo4j-launcher.jar").is_file() or not (built / "lib").is_dir():
            raise ConfigError(f"Maven finished but produced no launcher jar; see {log}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        (built / "neo4j-launcher.jar").replace(target / "neo4j-launcher.jar")
        (built / "lib").replace(target / "lib")
        shutil.rmtree(work, ignore_errors=True)
        (target / "READY").write_text(f"{time.time():.0f}\n")
        logger.info("launcher built in %.0f s", time.monotonic() - started)
    return classpath


# --------------------------------------------------------------------------- lifecycle


def _resolve(
    settings: AtlasSettings | None,
    home: Path | None,
    port: int | None,
    heap: str | None,
    pagecache: str | None,
    build_root: Path | None,
) -> LocalNeo4j:
    if settings is not None:
        base = LocalNeo4j.from_settings(settings)
    elif home is not None:
        base = LocalNeo4j(home=Path(home), port=port or 7697)
    else:
        raise ConfigError("local Neo4j: give settings or an explicit home")
    return LocalNeo4j(
        home=Path(home) if home is not None else base.home,
        port=port if port is not None else base.port,
        heap=heap or base.heap,
        pagecache=pagecache or base.pagecache,
        build_root=build_root or base.build_root,
    )


def _live_record(spec: LocalNeo4j) -> dict[str, Any] | None:
    """The pid-file record of a live launcher on this home, removing a stale pid file."""
    record = read_pid_file(spec.pid_file)
    if record is None:
        return None
    pid = int(record["pid"])
    command = pid_cmdline(pid)
    if pid_alive(pid) and MAIN_CLASS in command and f"--home {record.get('home')}" in command:
        return record
    logger.info("removing stale pid file %s (pid %d is gone)", spec.pid_file, pid)
    spec.pid_file.unlink(missing_ok=True)
    return None


def bolt_answers(uri: str, timeout_s: float = 3.0) -> bool:
    """Whether a Bolt server at ``uri`` answers a connectivity check.

    Connects without credentials; a server that answers "unauthorized" counts as answering.
    """
    import neo4j
    import neo4j.exceptions as neo4j_errors

    try:
        with neo4j.GraphDatabase.driver(
            uri, auth=None, connection_timeout=timeout_s, max_connection_pool_size=1
        ) as driver:
            driver.verify_connectivity()
    except neo4j_errors.AuthError:
        return True
    except Exception:  # any other failure means "does not answer"
        return False
    return True


def start(
    settings: AtlasSettings | None = None,
    *,
    home: Path | None = None,
    port: int | None = None,
    heap: str | None = None,
    pagecache: str | None = None,
    build_root: Path | None = None,
    timeout_s: float = 180.0,
    progress: Progress | None = None,
    die_with_parent: bool = False,
    auth: bool = False,
    jvm_options: Sequence[str] = (),
) -> str:
    """Start the local Neo4j as a detached background process and return its Bolt URI.

    Explicit arguments override the settings. Blocks until Bolt answers. Raises
    :class:`LauncherAlreadyRunning` (a :class:`ConfigError`) when a launcher already runs on this
    home, and :class:`ConfigError` for a missing Java/Maven, a port in use or a locked store.
    ``die_with_parent=True`` (tests) makes the server exit when the calling process dies.
    ``auth=True`` (tests of credential errors) turns authentication on: the initial user is
    ``neo4j`` / ``neo4j`` and must change its password before it can run queries.
    ``jvm_options`` are appended to the JVM's options (e.g. ``-XX:TieredStopAtLevel=1`` for a
    faster start of short-lived test servers).
    """
    spec = _resolve(settings, home, port, heap, pagecache, build_root)
    spec.home.mkdir(parents=True, exist_ok=True)
    with file_lock(spec.home / ".launcher.lock"):
        record = _live_record(spec)
        if record is not None:
            uri = str(record.get("uri", spec.uri))
            raise LauncherAlreadyRunning(
                f"local Neo4j already runs on {spec.home} at {uri} (pid {record['pid']}); "
                "not starting another",
                uri=uri,
                pid=int(record["pid"]),
            )
        java = _find_java()
        if port_in_use(spec.port):
            raise ConfigError(
                f"port 127.0.0.1:{spec.port} is already in use: stop what listens there or set "
                "NEO4J_BOLT_PORT to a free port"
            )
        classpath = build_launcher(spec.resolved_build_root, progress=progress)
        (spec.home / "logs").mkdir(exist_ok=True)
        conf = spec.home / "conf" / "neo4j.conf"
        conf.parent.mkdir(exist_ok=True)
        conf.write_text("".join(f"{key}={value}\n" for key, value in _EXTRA_CONF.items()))
        cds_options, cds_dump = _cds_options(classpath[0].parent)
        command = [
            java,
            f"-Xmx{spec.heap}",
            *cds_options,
            *jvm_options,
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Dfile.encoding=UTF-8",
            *_ADD_OPENS,
            "-cp",
            os.pathsep.join(str(entry) for entry in classpath),
            MAIN_CLASS,
            "--home",
            str(spec.home),
            "--port",
            str(spec.port),
            "--pagecache",
            spec.pagecache,
            "--config",
            str(conf),
            "--auth",
            "true" if auth else "false",
        ]
        logger.info("starting local Neo4j: %s", " ".join(command))
        if progress:
            progress(f"starting local Neo4j on {spec.uri} (home {spec.home}) ...")
        with spec.log_file.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                cwd=spec.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_proc.die_with_parent() if die_with_parent else None,
            )
        write_pid_file(
            spec.pid_file,
            {
                "pid": proc.pid,
                "port": spec.port,
                "uri": spec.uri,
                "home": str(spec.home),
                "cds_dump": str(cds_dump) if cds_dump else None,
            },
        )
        try:
            _wait_until_ready(spec, proc, timeout_s)
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            spec.pid_file.unlink(missing_ok=True)
            if cds_dump is not None:
                cds_dump.unlink(missing_ok=True)
            raise
    logger.info("local Neo4j is up at %s (pid %d)", spec.uri, proc.pid)
    return spec.uri


def _wait_until_ready(spec: LocalNeo4j, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise _launch_failure(spec, code)
        if bolt_answers(spec.uri, timeout_s=2.0):
            return
        time.sleep(0.5)
    raise ServiceUnavailable(
        f"local Neo4j did not answer on {spec.uri} within {timeout_s:.0f} s; see {spec.log_file}"
    )


def _launch_failure(spec: LocalNeo4j, code: int) -> ConfigError:
    tail = log_tail(spec.log_file, 60)
    reason = next(
        (line for line in reversed(tail.splitlines()) if line.startswith("circuit-atlas-neo4j:")),
        "",
    ).removeprefix("circuit-atlas-neo4j: ")
    if code == EXIT_LOCKED:
        return ConfigError(
            f"store locked: {spec.home} is in use by another Neo4j process; stop it first"
        )
    if code == EXIT_PORT:
        return ConfigError(
            f"port 127.0.0.1:{spec.port} is already in use: stop what listens there or set "
            "NEO4J_BOLT_PORT to a free port"
        )
    detail = one_line(reason) if reason else "no reason given"
    return ConfigError(
        f"local Neo4j exited with code {code} during start: {detail}; see {spec.log_file}"
    )


def stop(
    settings: AtlasSettings | None = None,
    *,
    home: Path | None = None,
    timeout_s: float = 120.0,
) -> bool:
    """Stop the launcher on this home with SIGTERM and wait for a clean exit.

    Returns True when a running launcher was stopped, False when none was running. Falls back to
    SIGKILL only after ``timeout_s``.
    """
    spec = _resolve(settings, home, None, None, None, None)
    if not spec.home.exists():
        return False
    with file_lock(spec.home / ".launcher.lock"):
        record = _live_record(spec)
        if record is None:
            return False
        pid = int(record["pid"])
        logger.info("stopping local Neo4j (pid %d)", pid)
        clean = _proc.terminate(pid, timeout_s, kill_wait_s=10.0)
        if not clean:
            logger.warning(
                "local Neo4j (pid %d) ignored SIGTERM for %.0f s: killed", pid, timeout_s
            )
        spec.pid_file.unlink(missing_ok=True)
        if record.get("cds_dump"):
            _publish_cds_archive(Path(record["cds_dump"]), keep=clean)
    return True


# --------------------------------------------------------------------------- class data sharing


def _cds_options(build_dir: Path) -> tuple[list[str], Path | None]:
    """JVM options for an application class-data-sharing archive of the launcher.

    Starting Neo4j loads thousands of classes from ~200 jars; a CDS archive roughly halves the
    start time. The first start dumps one at exit (``-XX:ArchiveClassesAtExit``) and
    :func:`stop` publishes it as ``<build>/neo4j.jsa``; later starts map it. A missing or stale
    archive is harmless: the JVM then just loads classes normally.
    """
    archive = build_dir / "neo4j.jsa"
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"], None
    dump = build_dir / f"neo4j-{os.getpid()}-{time.monotonic_ns()}.jsa.part"
    return [f"-XX:ArchiveClassesAtExit={dump}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"], dump


def _publish_cds_archive(dump: Path, *, keep: bool) -> None:
    archive = dump.parent / "neo4j.jsa"
    try:
        if keep and dump.is_file() and dump.stat().st_size > 0 and not archive.exists():
            dump.replace(archive)
            logger.info("published the launcher's class-data archive %s", archive)
    except OSError:
        logger.debug("could not publish %s", dump, exc_info=True)
    dump.unlink(missing_ok=True)


def status(
    settings: AtlasSettings | None = None,
    *,
    home: Path | None = None,
) -> Neo4jStatus:
    """Whether a launcher runs on this home and whether its Bolt port answers."""
    spec = _resolve(settings, home, None, None, None, None)
    record = _live_record(spec) if spec.home.exists() else None
    if record is None:
        return Neo4jStatus(running=False, answers=False, uri=spec.uri, pid=None, home=spec.home)
    uri = str(record.get("uri", spec.uri))
    return Neo4jStatus(
        running=True,
        answers=bolt_answers(uri),
        uri=uri,
        pid=int(record["pid"]),
        home=spec.home,
    )
