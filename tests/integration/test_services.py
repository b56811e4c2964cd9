"""Smoke and fault tests of the service layer against real servers: Neo4j, Redis, a worker."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import neo4j
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from atlas.errors import AuthError, ConfigError, ServiceUnavailable, StoreError
from atlas.services import _proc, neo4j_local, redis_local
from atlas.settings import AtlasSettings
from atlas.store import schema
from atlas.store.connection import open_driver
from tests import REPO_ROOT
from tests.servers import TEST_JVM_OPTIONS, launcher_build_root

pytestmark = pytest.mark.timeout(600)


def _settings(**kwargs: Any) -> AtlasSettings:
    return AtlasSettings(_env_file=None, **kwargs)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- Neo4j


def test_write_and_read_through_bolt(clean_neo4j: neo4j.Driver) -> None:
    clean_neo4j.execute_query("CREATE (:Smoke {name: $name, n: $n})", name="bolt", n=42)
    records, _, _ = clean_neo4j.execute_query(
        "MATCH (s:Smoke {name: $name}) RETURN s.n AS n", name="bolt"
    )
    assert [r["n"] for r in records] == [42]


def test_schema_init_is_idempotent(neo4j_driver: neo4j.Driver) -> None:
    first = schema.apply_schema(neo4j_driver, force=True)
    constraints = {r["name"] for r in neo4j_driver.execute_query("SHOW CONSTRAINTS").records}
    indexes = {r["name"] for r in neo4j_driver.execute_query("SHOW INDEXES").records}
    again = schema.apply_schema(neo4j_driver, force=True)
    assert first.statements == again.statements > 0 and not first.skipped
    # recorded files are skipped next time (the 0005 conversion scans every aggregate)
    second = schema.apply_schema(neo4j_driver)
    assert second.statements == 0 and second.skipped == first.files
    assert first.files == second.files == [p.name for p in schema.schema_files()]
    assert {
        r["name"] for r in neo4j_driver.execute_query("SHOW CONSTRAINTS").records
    } == constraints
    assert {r["name"] for r in neo4j_driver.execute_query("SHOW INDEXES").records} == indexes
    states = {r["state"] for r in neo4j_driver.execute_query("SHOW INDEXES").records}
    assert states == {"ONLINE"}


def test_schema_error_names_file_and_statement(neo4j_driver: neo4j.Driver, tmp_path: Path) -> None:
    (tmp_path / "0001_bad.cypher").write_text("// broken on purpose\nCREATE NONSENSE;\n")
    with pytest.raises(StoreError, match=r"at 0001_bad\.cypher statement 1: .*"):
        schema.apply_schema(neo4j_driver, tmp_path)


def test_split_statements_handles_comments_and_multiline() -> None:
    text = (
        "// header comment\n"
        "CREATE CONSTRAINT a IF NOT EXISTS FOR (n:A) REQUIRE n.id IS UNIQUE; // trailing\n"
        "\n"
        "CREATE INDEX b IF NOT EXISTS\n"
        "  FOR (n:B) ON (n.url);\n"
        "MATCH (n {u: 'http://x;y'}) RETURN n;\n"
    )
    assert schema.split_statements(text) == [
        "CREATE CONSTRAINT a IF NOT EXISTS FOR (n:A) REQUIRE n.id IS UNIQUE",
        "CREATE INDEX b IF NOT EXISTS\n  FOR (n:B) ON (n.url)",
        "MATCH (n {u: 'http://x;y'}) RETURN n",
    ]


def test_unreachable_neo4j_is_one_line_service_unavailable() -> None:
    uri = f"bolt://127.0.0.1:{_proc.free_port()}"
    with pytest.raises(ServiceUnavailable) as info:
        open_driver(_settings(neo4j_uri=uri), connection_timeout_s=2.0)
    message = str(info.value)
    assert message.startswith(f"Neo4j at {uri} is not reachable")
    assert "\n" not in message


def test_launcher_lifecycle_persistence_and_faults(tmp_path: Path) -> None:
    """One store, two starts: first through the API with auth on (wrong password, second start
    refused, port in use), then through ``atlas db start|status|stop`` (data survives)."""
    from atlas.cli import cli

    home = tmp_path / "neo4j"  # = settings.local_neo4j_home for ATLAS_HOME=tmp_path
    port = _proc.free_port()
    common: dict[str, Any] = {
        "home": home,
        "port": port,
        "heap": "512m",
        "pagecache": "128m",
        "build_root": launcher_build_root(),
        "die_with_parent": True,
        "jvm_options": TEST_JVM_OPTIONS,
        "auth": True,
    }
    uri = neo4j_local.start(**common)
    try:
        assert uri == f"bolt://127.0.0.1:{port}"
        first = neo4j_local.status(home=home)
        assert first.running and first.answers and first.uri == uri

        # wrong password -> AuthError with the promised message
        with pytest.raises(
            AuthError, match=f"Neo4j at {uri} refused the credentials for user neo4j"
        ):
            open_driver(_settings(neo4j_uri=uri, neo4j_password=SecretStr("wrong-password")))

        # a second start on the running store is refused and starts nothing
        with pytest.raises(neo4j_local.LauncherAlreadyRunning, match="already runs"):
            neo4j_local.start(**{**common, "port": _proc.free_port()})
        assert neo4j_local.status(home=home).pid == first.pid

        # a launcher that lost its pid file still holds the store lock: "store locked"
        parked = home / "neo4j.pid.parked"
        (home / "neo4j.pid").rename(parked)
        try:
            with pytest.raises(ConfigError, match="store locked"):
                neo4j_local.start(**{**common, "port": _proc.free_port()})
        finally:
            parked.rename(home / "neo4j.pid")

        # another store on the same port: port in use, one line
        with pytest.raises(ConfigError, match="already in use"):
            neo4j_local.start(**{**common, "home": tmp_path / "other"})

        # the initial neo4j/neo4j must change its password before it may write
        with neo4j.GraphDatabase.driver(uri, auth=("neo4j", "neo4j")) as driver:
            driver.execute_query(
                "ALTER CURRENT USER SET PASSWORD FROM 'neo4j' TO 'atlas-secret'", database_="system"
            )
        settings = _settings(neo4j_uri=uri, neo4j_password=SecretStr("atlas-secret"))
        with open_driver(settings) as driver:
            driver.execute_query("CREATE (:Persisted {v: 'survives restart'})")
    finally:
        assert neo4j_local.stop(home=home)
    assert not neo4j_local.status(home=home).running
    assert not neo4j_local.stop(home=home)

    # restart through the CLI (local mode: no NEO4J_URI), on the same store; the launcher build
    # under ATLAS_HOME is the shared one, so Maven does not run again
    (tmp_path / "launcher").symlink_to(launcher_build_root(), target_is_directory=True)
    env = {
        "ATLAS_HOME": str(tmp_path),
        "NEO4J_BOLT_PORT": str(port),
        "NEO4J_HEAP": "512m",
        "NEO4J_PAGECACHE": "128m",
        "NEO4J_URI": None,
    }
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["db", "start"], env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().splitlines()[-1] == uri
        result = runner.invoke(cli, ["db", "status"], env=env)
        assert result.exit_code == 0 and "answers" in result.output
        pid = neo4j_local.status(home=home).pid
        result = runner.invoke(cli, ["db", "start"], env=env)
        assert result.exit_code == 0 and "already runs" in result.output
        assert neo4j_local.status(home=home).pid == pid
        with open_driver(_settings(neo4j_uri=uri)) as driver:
            records = driver.execute_query("MATCH (p:Persisted) RETURN p.v AS v").records
        assert [r["v"] for r in records] == ["survives restart"]
    finally:
        result = runner.invoke(cli, ["db", "stop"], env=env)
        neo4j_local.stop(home=home)
    assert result.exit_code == 0 and "stopped" in result.output
    result = runner.invoke(cli, ["db", "status"], env=env)
    assert result.exit_code == 1 and "not running" in result.output


def test_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    home = tmp_path / "neo4j"
    home.mkdir()
    _proc.write_pid_file(home / "neo4j.pid", {"pid": 2**22 - 3, "port": 1, "uri": "bolt://x"})
    state = neo4j_local.status(home=home)
    assert not state.running
    assert not (home / "neo4j.pid").exists()


def test_missing_java_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(ConfigError, match="apt-get install openjdk-17-jre-headless"):
        neo4j_local.start(home=tmp_path / "neo4j", port=_proc.free_port(), build_root=tmp_path)


# --------------------------------------------------------------------------- Redis / Celery


def test_ping_round_trips_through_redis_and_a_real_worker(
    celery_app: Any, start_worker: Any
) -> None:
    from workers.app import ping

    # its own queue: a workers.app worker on the shared queues would swallow (as unregistered)
    # the pipeline tasks that other tests send to their workers.tasks worker
    queue = f"ping-{uuid.uuid4().hex[:8]}"
    worker = start_worker(app_module="workers.app", queues=queue)
    try:
        answer = ping(celery_app, payload={"hello": [1, 2, 3]}, timeout_s=60, queue=queue)
    finally:
        worker.stop()
    assert answer["pong"] == {"hello": [1, 2, 3]}
    assert answer["pid"] == worker.proc.pid


def test_celery_app_policy(celery_app: Any) -> None:
    conf = celery_app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] >= 6 * 3600
    assert conf.result_backend_transport_options["visibility_timeout"] >= 6 * 3600
    assert conf.result_backend == conf.broker_url
    router = celery_app.amqp.router
    assert router.route({}, "atlas.attribute")["queue"].name == "attribute"
    assert router.route({}, "atlas.ingest")["queue"].name == "ingest"


def test_routing_puts_each_task_in_exactly_one_queue(redis_url: str) -> None:
    """With no worker on db 15, published messages stay in Redis where routing put them."""
    import os

    import redis

    if os.environ.get("REDIS_URL") and os.environ.get("ATLAS_TEST_ALLOW_WIPE") != "1":
        pytest.skip("REDIS_URL is someone else's server: not flushing its db 15")

    from workers.app import make_celery

    url = redis_url.rsplit("/", 1)[0] + "/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = make_celery(_settings(redis_url=url))
    app.send_task("atlas.attribute", args=[{"x": 1}])
    app.send_task("atlas.ingest", args=[{"x": 2}])
    app.send_task("atlas.ingest", args=[{"x": 3}])
    app.send_task("atlas.ping", args=["p"])  # default queue: ingest
    assert client.llen("attribute") == 1
    assert client.llen("ingest") == 3
    client.flushdb()
    client.close()


def test_redis_down_is_one_line_service_unavailable() -> None:
    from workers.app import check_broker, make_celery

    url = f"redis://127.0.0.1:{_proc.free_port()}/0"
    with pytest.raises(ServiceUnavailable) as info:
        make_celery(_settings(redis_url=url), check=True)
    assert str(info.value).startswith(f"Redis at {url} is not reachable")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        check_broker(_settings(redis_url=None))


def test_local_redis_has_aof_and_stops(tmp_path: Path) -> None:
    import redis

    server = redis_local.start(tmp_path / "r", die_with_parent=True)
    try:
        assert redis_local.start(tmp_path / "r").pid == server.pid  # reuse, not a second one
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.set("k", "v")
        client.close()
    finally:
        assert redis_local.stop(tmp_path / "r")
    assert redis_local.running(tmp_path / "r") is None
    assert not redis_local.stop(tmp_path / "r")


# --------------------------------------------------------------------------- CLI


def test_cli_db_status_and_init_against_external_server(
    neo4j_target: Any, neo4j_settings: AtlasSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atlas.cli import cli

    env = {
        "NEO4J_URI": neo4j_target.uri,
        "NEO4J_USER": neo4j_target.user,
        "NEO4J_PASSWORD": neo4j_target.password,
        "ATLAS_HOME": str(neo4j_settings.atlas_home),
    }
    runner = CliRunner()
    result = runner.invoke(cli, ["db", "status"], env=env)
    assert result.exit_code == 0, result.output
    assert "answers" in result.output
    result = runner.invoke(cli, ["db", "start"], env=env)
    assert result.exit_code == 0 and "nothing to start" in result.output
    result = runner.invoke(cli, ["db", "init"], env=env)
    assert result.exit_code == 0, result.output
    assert "indexes online" in result.output


def _atlas(args: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "atlas", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    return out.returncode, out.stderr.strip().splitlines()


def test_cli_faults_are_one_line_and_nonzero(tmp_path: Path) -> None:
    port = _proc.free_port()
    base = {"PATH": "/usr/bin:/bin", "ATLAS_HOME": str(tmp_path), "HOME": str(tmp_path)}

    code, lines = _atlas(["db", "init"], {**base, "NEO4J_URI": f"bolt://127.0.0.1:{port}"})
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: Neo4j at bolt://127.0.0.1:{port} is not reachable")

    code, lines = _atlas(["db", "start"], {**base, "PATH": str(tmp_path)})  # no java on PATH
    assert code == 1 and len(lines) == 1, lines
    assert lines[0] == (
        "error: Java not found: install a Java 17 runtime, e.g. apt-get install "
        "openjdk-17-jre-headless"
    )

    with socket.create_server(("127.0.0.1", port)):  # port in use: refused before Maven/JVM
        code, lines = _atlas(["db", "start"], {**base, "NEO4J_BOLT_PORT": str(port)})
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: port 127.0.0.1:{port} is already in use")
