"""Shared fixtures: real Neo4j, real Redis, a real Celery worker. Nothing is mocked.

Where each service comes from, in order:

* Neo4j: ``NEO4J_URI`` (+ ``NEO4J_USER`` / ``NEO4J_PASSWORD``) from the environment; else a
  testcontainers ``neo4j:5.26-community`` container when a Docker engine answers within a second;
  else the local launcher (``atlas.services.neo4j_local``) on a free port with a temporary home.
  A server named by ``NEO4J_URI`` is only wiped when ``ATLAS_TEST_ALLOW_WIPE=1``; otherwise the
  tests that need a clean database fail loudly (deselect them with ``-m "not neo4j"``), so a
  ``.env`` pointing at a shared server never reports success over suites that did not run.
* Redis: ``REDIS_URL``; else a testcontainers Redis; else ``redis-server`` on a free port.

Fixtures (session-scoped unless noted):
    neo4j_target      Neo4jTarget(uri, user, password, kind, allow_wipe)
    neo4j_uri         the Bolt URI
    neo4j_driver      a connected ``neo4j.Driver``
    neo4j_schema      the driver, with schema/*.cypher applied once
    clean_neo4j       (function) the driver, with the database wiped before the test
    db                (function) clean_neo4j with schema/*.cypher applied
    neo4j_settings    AtlasSettings pointing at the test Neo4j (temporary atlas_home, no Redis)
    redis_url         the Redis URL
    service_settings  AtlasSettings pointing at the test Neo4j and Redis
    celery_app        ``make_celery(service_settings)``
    start_worker      factory: start_worker(app_module="workers.tasks", queues=...) -> Worker
    celery_worker     a real ``celery worker`` subprocess for ``workers.tasks`` on both queues

Every test starts with ``random``, numpy and torch seeded (``_seeded``, autouse).

Tests that use the Neo4j fixtures get the ``neo4j`` marker and those that use Redis get ``redis``
automatically, so ``pytest -m "not neo4j"`` deselects them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from atlas.services import _proc
from tests import REPO_ROOT
from tests.servers import TEST_JVM_OPTIONS, launcher_build_root, spawn, subprocess_env

logger = logging.getLogger("tests.conftest")

NEO4J_IMAGE = "neo4j:5.26-community"
REDIS_IMAGE = "redis:7-alpine"

_NEO4J_FIXTURES = {
    "neo4j_target",
    "neo4j_uri",
    "neo4j_driver",
    "neo4j_schema",
    "clean_neo4j",
    "neo4j_settings",
}
_REDIS_FIXTURES = {"redis_url", "service_settings", "celery_app", "start_worker", "celery_worker"}


#: The seed every test starts from (``random``, numpy and torch, CPU and CUDA).
TEST_SEED = 0


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Seed the global generators before each test, so a test that draws from them (rather than
    from an explicit generator) is reproducible and independent of the order tests run in."""
    import random

    import numpy as np
    import torch

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the services their fixtures need."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & (_NEO4J_FIXTURES | {"service_settings", "celery_worker"}):
            item.add_marker(pytest.mark.neo4j)
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)


# --------------------------------------------------------------------------- helpers


def docker_available(timeout_s: float = 1.0) -> bool:
    """Whether a Docker engine answers within ``timeout_s`` (False on any error)."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # docker.errors.DockerException, connection errors, missing package
        return False


@dataclass(frozen=True)
class Neo4jTarget:
    """The Neo4j server the tests talk to."""

    uri: str
    user: str
    password: str
    kind: str  # "env" | "container" | "launcher"
    allow_wipe: bool


# --------------------------------------------------------------------------- Neo4j


@pytest.fixture(scope="session")
def neo4j_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neo4jTarget]:
    env_uri = os.environ.get("NEO4J_URI")
    if env_uri:
        yield Neo4jTarget(
            uri=env_uri,
            user=os.environ.get("NEO4J_USER", "neo4j"),
            password=os.environ.get("NEO4J_PASSWORD", ""),
            kind="env",
            allow_wipe=os.environ.get("ATLAS_TEST_ALLOW_WIPE") == "1",
        )
        return

    if docker_available():
        try:
            from testcontainers.neo4j import Neo4jContainer

            password = "atlas-test-" + uuid.uuid4().hex[:8]
            container = Neo4jContainer(NEO4J_IMAGE, password=password)
            container.start()
        except Exception as exc:
            logger.warning("testcontainers Neo4j failed (%s): using the local launcher", exc)
        else:
            try:
                yield Neo4jTarget(
                    uri=container.get_connection_url(),
                    user="neo4j",
                    password=password,
                    kind="container",
                    allow_wipe=True,
                )
            finally:
                container.stop()
            return

    from atlas.services import neo4j_local

    home = tmp_path_factory.mktemp("neo4j-home")
    uri = neo4j_local.start(
        home=home,
        port=_proc.free_port(),
        heap="768m",
        pagecache="256m",
        build_root=launcher_build_root(),
        die_with_parent=True,
        jvm_options=TEST_JVM_OPTIONS,
    )
    try:
        yield Neo4jTarget(uri=uri, user="neo4j", password="", kind="launcher", allow_wipe=True)
    finally:
        neo4j_local.stop(home=home)


@pytest.fixture(scope="session")
def neo4j_uri(neo4j_target: Neo4jTarget) -> str:
    return neo4j_target.uri


@pytest.fixture(scope="session")
def neo4j_settings(neo4j_target: Neo4jTarget, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """AtlasSettings for the test Neo4j (temporary atlas_home; no Redis: inline mode)."""
    from pydantic import SecretStr

    from atlas.settings import AtlasSettings

    return AtlasSettings(
        _env_file=None,  # type: ignore[call-arg]
        atlas_home=tmp_path_factory.mktemp("atlas-home"),
        neo4j_uri=neo4j_target.uri,
        neo4j_user=neo4j_target.user,
        neo4j_password=SecretStr(neo4j_target.password),
        redis_url=None,
    )


@pytest.fixture(scope="session")
def neo4j_driver(neo4j_settings: Any) -> Iterator[Any]:
    from atlas.store.connection import open_driver

    driver = open_driver(neo4j_settings)
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture(scope="session")
def neo4j_schema(neo4j_driver: Any) -> Any:
    """The session driver, with ``schema/*.cypher`` applied once (indexes ONLINE)."""
    from atlas.store.schema import apply_schema

    apply_schema(neo4j_driver)
    return neo4j_driver


def wipe_database(driver: Any, database: str = "neo4j") -> None:
    """Delete every node and relationship (constraints and indexes stay)."""
    from atlas.store import queries

    with driver.session(database=database) as session:
        session.run(queries.WIPE_DATABASE).consume()


@pytest.fixture()
def clean_neo4j(neo4j_driver: Any, neo4j_target: Neo4jTarget) -> Any:
    """The session driver, with the database emptied before the test."""
    if not neo4j_target.allow_wipe:
        pytest.fail(
            "NEO4J_URI points at a server these tests may not wipe: set ATLAS_TEST_ALLOW_WIPE=1, "
            'unset NEO4J_URI, or deselect them with -m "not neo4j"',
            pytrace=False,
        )
    wipe_database(neo4j_driver)
    return neo4j_driver


@pytest.fixture()
def db(clean_neo4j: Any) -> Any:
    """The session driver on an emptied database with the schema applied (most store tests)."""
    from atlas.store.schema import apply_schema

    apply_schema(clean_neo4j)
    return clean_neo4j


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env_url = os.environ.get("REDIS_URL")
    if env_url:
        yield env_url
        return

    if docker_available():
        try:
            from testcontainers.redis import RedisContainer

            container = RedisContainer(REDIS_IMAGE)
            container.start()
        except Exception as exc:
            logger.warning("testcontainers Redis failed (%s): using a local redis-server", exc)
        else:
            try:
                host = container.get_container_host_ip()
                port = container.get_exposed_port(6379)
                yield f"redis://{host}:{port}/0"
            finally:
                container.stop()
            return

    from atlas.services import redis_local

    directory = tmp_path_factory.mktemp("redis")
    server = redis_local.start(directory, die_with_parent=True)
    try:
        yield server.url
    finally:
        redis_local.stop(directory)


@pytest.fixture(scope="session")
def service_settings(neo4j_settings: Any, redis_url: str) -> Any:
    """AtlasSettings for the test Neo4j and the test Redis (Celery mode)."""
    return neo4j_settings.model_copy(update={"redis_url": redis_url})


@pytest.fixture(scope="session")
def celery_app(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The project's Celery app wired to the test Redis (no Neo4j needed)."""
    from atlas.settings import AtlasSettings
    from workers.app import make_celery

    settings = AtlasSettings(
        _env_file=None,  # type: ignore[call-arg]
        atlas_home=tmp_path_factory.mktemp("celery-home"),
        redis_url=redis_url,
    )
    return make_celery(settings, check=True)


# --------------------------------------------------------------------------- Celery worker


@dataclass
class Worker:
    """A real ``celery worker`` subprocess."""

    proc: subprocess.Popen[bytes]
    hostname: str
    log: Path
    env: dict[str, str] = field(repr=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_worker_ready(worker: Worker, app: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"celery worker exited with code {worker.proc.returncode}:\n"
                + worker.log_text()[-4000:]
            )
        replies = app.control.ping(destination=[worker.hostname], timeout=1.0)
        if replies:
            return
    worker.stop()
    raise RuntimeError(
        f"celery worker {worker.hostname} not ready in {timeout_s:.0f} s:\n"
        + worker.log_text()[-4000:]
    )


@pytest.fixture(scope="session")
def start_worker(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    """Factory for real worker subprocesses, all stopped at the end of the session.

    ``start_worker(app_module="workers.tasks", queues="attribute,ingest", settings=None,
    extra_env=None, pool="solo")``: with ``settings`` the worker gets their ATLAS_HOME, NEO4J_*
    and REDIS_URL; without, only the test Redis. Workers live until ``worker.stop()`` or the end
    of the session, and a worker takes every message on its queues (discarding tasks its app
    does not know): give a worker of another app, or a short-lived one, its own queue name.
    """
    from atlas.settings import AtlasSettings
    from workers.app import make_celery

    started: list[Worker] = []
    logs = tmp_path_factory.mktemp("celery-logs")

    def _start(
        app_module: str = "workers.tasks",
        queues: str = "attribute,ingest",
        settings: Any = None,
        extra_env: dict[str, str] | None = None,
        pool: str = "solo",
        timeout_s: float = 120.0,
    ) -> Worker:
        if settings is None:
            settings = AtlasSettings(
                _env_file=None,  # type: ignore[call-arg]
                atlas_home=tmp_path_factory.mktemp("worker-home"),
                redis_url=redis_url,
            )
        hostname = f"atlas-test-{uuid.uuid4().hex[:8]}@localhost"
        log = logs / f"{hostname.split('@')[0]}.log"
        env = subprocess_env(settings, drop=("NEO4J_", "CELERY_"), extra=extra_env)
        argv = [
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            "-Q", queues, "-c", "1", "-P", pool, "--prefetch-multiplier", "1",
            "-n", hostname, "-l", "info", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with log.open("wb") as handle:
            proc = spawn(argv, cwd=REPO_ROOT, env=env, stdout=handle)
        worker = Worker(proc=proc, hostname=hostname, log=log, env=env)
        started.append(worker)
        _wait_worker_ready(worker, make_celery(settings), timeout_s)
        return worker

    try:
        yield _start
    finally:
        for worker in started:
            with contextlib.suppress(Exception):
                worker.stop()


@pytest.fixture(scope="session")
def celery_worker(start_worker: Callable[..., Worker], service_settings: Any) -> Worker:
    """A real worker for the pipeline's tasks (``workers.tasks``) on both queues."""
    return start_worker(app_module="workers.tasks", settings=service_settings)
