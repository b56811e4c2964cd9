"""The demo's own services: a local Neo4j and redis-server in the demo home, and real Celery
worker subprocesses (``atlas worker``), each started here and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from atlas.errors import ServiceUnavailable
from workers.app import ATTRIBUTE_QUEUE, INGEST_QUEUE

Workers = list[tuple[str, subprocess.Popen[bytes]]]


class Steps:
    """Prints each step with its wall time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        click.echo(click.style(f"==> {what}", bold=True), err=True)
        t = time.monotonic()
        yield
        click.echo(f"    done in {time.monotonic() - t:.1f}s", err=True)

    @property
    def total(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class DemoServices:
    """What the demo runs on: its settings, the Celery app, a driver."""

    settings: Any
    app: Any
    driver: Any


@contextlib.contextmanager
def demo_services(home: Path, user: Any, steps: Steps) -> Iterator[DemoServices]:
    """Start Neo4j, Redis and two workers (attribute, ingest) for the demo home; stop them all
    on the way out (one left over from an interrupted demo is reused, then stopped too)."""
    from atlas.services import _proc, neo4j_local, redis_local
    from atlas.settings import AtlasSettings
    from atlas.store.connection import open_driver
    from workers.app import make_celery

    neo4j_home, redis_dir = home / "neo4j", home / "redis"
    workers: Workers = []
    driver = None
    started_neo4j = started_redis = False
    try:
        with steps.step(f"local Neo4j and Redis in {home}"):
            state = neo4j_local.status(home=neo4j_home)
            started_neo4j = True
            if state.running:
                uri = state.uri
            else:
                uri = neo4j_local.start(
                    home=neo4j_home,
                    port=_proc.free_port(),
                    heap="1g",
                    pagecache="512m",
                    build_root=user.atlas_home / "launcher",
                )
            started_redis = True
            server = redis_local.running(redis_dir) or redis_local.start(redis_dir)
            click.echo(f"    Neo4j {uri}   Redis {server.url}", err=True)
            settings = AtlasSettings(
                _env_file=None,  # type: ignore[call-arg]
                atlas_home=home,
                neo4j_uri=uri,
                redis_url=server.url,
                batch_size=user.batch_size,
            )
        app = make_celery(settings)
        with steps.step("workers (attribute + ingest)"):
            workers = start_workers(settings, home / "logs")
            wait_workers_ready(app, workers, home / "logs", timeout_s=300)
        driver = open_driver(settings)
        yield DemoServices(settings=settings, app=app, driver=driver)
    finally:
        if driver is not None:
            driver.close()
        if workers:
            stop_workers(workers)
        if started_redis:
            redis_local.stop(redis_dir)
        if started_neo4j:
            neo4j_local.stop(home=neo4j_home)


def _worker_env(settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "CELERY_"))}
    env.update(
        {
            "ATLAS_HOME": str(settings.atlas_home),
            "NEO4J_URI": settings.resolved_neo4j_uri,
            "NEO4J_USER": settings.neo4j_user,
            "NEO4J_PASSWORD": settings.neo4j_password.get_secret_value(),
            "REDIS_URL": settings.redis_url or "",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    return env


def start_workers(settings: Any, logs: Path) -> Workers:
    """One attribute worker and one ingest worker (``atlas worker``), each in its own session."""
    logs.mkdir(parents=True, exist_ok=True)
    env = _worker_env(settings)
    started = []
    for queue in (ATTRIBUTE_QUEUE, INGEST_QUEUE):
        name = f"demo-{queue}-{os.getpid()}@localhost"
        argv = [sys.executable, "-m", "atlas", "worker", "--queues", queue, "--threads", "1"]
        argv += ["--name", name, "--loglevel", "info"]
        with (logs / f"worker-{queue}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append((name, proc))
    return started


def wait_workers_ready(app: Any, workers: Workers, logs: Path, timeout_s: float) -> None:
    pending = {name for name, _ in workers}
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, proc in workers:
            if proc.poll() is not None:
                raise ServiceUnavailable(
                    f"worker {name} exited with code {proc.returncode}: see {logs}"
                )
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"workers {sorted(pending)} not ready in {timeout_s:.0f}s")
        for reply in app.control.ping(destination=sorted(pending), timeout=1.0):
            pending -= set(reply)


def stop_workers(workers: Workers) -> None:
    for _, proc in workers:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown
    for _, proc in workers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
