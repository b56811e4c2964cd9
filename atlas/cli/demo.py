"""``atlas demo``: the whole pipeline on the toy world, from nothing to a cross-prompt answer.

What it does, in order (each step prints its wall time):

1. starts a local Neo4j and a local redis-server in a dedicated demo home
   (``{atlas_home}/demo`` by default, free ports), so a user's own atlas is never touched;
2. starts real Celery worker subprocesses (``atlas worker``): one on the ``attribute`` queue and
   one on the ``ingest`` queue, so ingestion of one prompt overlaps attribution of the next;
3. enqueues a batch of toy-corpus prompts (every hand/finger fact plus other facts) and waits
   with a progress bar; a re-run skips what the demo atlas already holds (``--fresh`` wipes it);
4. labels the features (logit lens + top activating tokens) through the worker's ``annotate``
   task and defines a ``Hand`` supernode from the labels that mention hand/finger;
5. prints every path from ``Hand`` to the logit ``5`` across the atlas, and the top
   contributors to ``5``, each with the Cypher behind it (the constant in
   :mod:`atlas.store.queries`);
6. stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from atlas.cli import get_settings
from atlas.errors import AtlasError, ConfigError, ServiceUnavailable
from workers.app import ANNOTATE_TASK, ATTRIBUTE_QUEUE, INGEST_QUEUE

#: Label pattern of the Hand supernode (a full-match regex over feature labels).
HAND_PATTERN = r"(?i).*\b(hands?|fingers?)\b.*"
HAND = "Hand"
TARGET = "5"


class _Steps:
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


def _start_workers(settings: Any, logs: Path) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """One attribute worker and one ingest worker (``atlas worker``), each in its own session."""
    logs.mkdir(parents=True, exist_ok=True)
    env = _worker_env(settings)
    started = []
    for queue in (ATTRIBUTE_QUEUE, INGEST_QUEUE):
        name = f"demo-{queue}-{os.getpid()}@localhost"
        argv = [
            sys.executable,
            "-m",
            "atlas",
            "worker",
            "--queues",
            queue,
            "--threads",
            "1",
            "--name",
            name,
            "--loglevel",
            "info",
        ]
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


def _wait_workers_ready(
    app: Any, workers: list[tuple[str, subprocess.Popen[bytes]]], logs: Path, timeout_s: float
) -> None:
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


def _stop_workers(workers: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
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


def _cypher_pointer(name: str, text: str) -> None:
    click.echo(click.style(f"Cypher: atlas.store.queries.{name}", dim=True))
    for line in text.strip().splitlines():
        click.echo(click.style(f"    {line}", dim=True))


def _prompt_texts(driver: Any, settings: Any, ids: list[str]) -> dict[str, str]:
    from atlas.store import queries as q

    with driver.session(database=settings.neo4j_database) as session:
        rows = session.run(q.PROMPT_TEXTS, prompt_ids=ids).data()
    return {r["prompt_id"]: r["text"] or "" for r in rows}


def _print_answer(
    driver: Any, settings: Any, max_hops: int, min_weight: float, limit: int
) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from atlas.store import queries as q
    from atlas.store.read import paths, top_contributors

    console = Console(width=max(140, Console().width))
    db = settings.neo4j_database
    result = paths(
        driver,
        f"supernode:{HAND}",
        f"logit:{TARGET}",
        max_hops=max_hops,
        min_weight=min_weight,
        limit=100_000,
        cap=100_000,
        database=db,
    )
    found, aggregate = result["paths"], result["aggregate"]
    n_prompts = len({p["prompt"] for p in found}) if found else 0
    click.echo()
    click.echo(
        click.style(f"All paths from {HAND} to '{TARGET}' across the atlas", bold=True)
        + f" (1..{max_hops} hops, every edge |w| >= {min_weight:g}: "
        + f"{sum(g['n_paths'] for g in aggregate)} paths"
        + f" in {n_prompts} prompts"
        + (", capped" if result.get("truncated") else "")
        + ")"
    )
    table = Table("route (Hand feature -> ... -> logit)", "prompts", "paths", "sum of scores")
    for g in aggregate[:limit]:
        table.add_row(
            " -> ".join(g["route"]),
            str(g["n_prompts"]),
            str(g["n_paths"]),
            f"{g['sum_score']:+.4g}",
        )
    console.print(table)
    if found:
        top = found[: min(10, limit)]
        texts = _prompt_texts(driver, settings, sorted({p["prompt"] for p in top}))
        table = Table("prompt", "nodes", "weights", "score", title="strongest single paths")
        for p in top:
            table.add_row(
                repr(texts.get(p["prompt"], p["prompt"][:12])),
                " -> ".join(p["nodes"]),
                ", ".join(f"{w:+.3g}" for w in p["weights"]),
                f"{p['score']:+.4g}",
            )
        console.print(table)
    _cypher_pointer(f"PATHS[{max_hops}]  (built from _PATHS_TEMPLATE)", q.PATHS[max_hops])
    click.echo(
        f"CLI: atlas query paths --from supernode:{HAND} --to logit:{TARGET} "
        f"--max-hops {max_hops} --min-weight {min_weight:g}"
    )

    rows = top_contributors(driver, f"logit:{TARGET}", limit=15, database=db)
    click.echo()
    click.echo(click.style(f"Top contributors to '{TARGET}' across the atlas", bold=True))
    table = Table("source", "kind", "layer", "prompts", "sum |w|", "sum w", "max w")
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["kind"]),
            str(r["layer"]),
            str(r["n_prompts"]),
            f"{r['sum_abs']:.4g}",
            f"{r['sum_w']:+.4g}",
            f"{r['max_w']:+.4g}",
        )
    console.print(table)
    _cypher_pointer("TOP_CONTRIBUTORS", q.TOP_CONTRIBUTORS)
    click.echo(f"CLI: atlas query contributors logit:{TARGET}")
    return {
        "n_paths": sum(g["n_paths"] for g in aggregate),
        "n_routes": len(aggregate),
        "n_prompts_with_paths": n_prompts,
        "n_contributors": len(rows),
    }


@click.command()
@click.option(
    "--prompts",
    "n_prompts",
    type=int,
    default=120,
    show_default=True,
    help="How many toy-corpus prompts to attribute (>= 100 in the README's demo).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Demo home (default: {ATLAS_HOME}/demo); never the user's own atlas.",
)
@click.option("--fresh", is_flag=True, help="Wipe the demo atlas first (recompute everything).")
@click.option("--max-hops", type=int, default=3, show_default=True)
@click.option(
    "--min-weight",
    type=float,
    default=0.3,
    show_default=True,
    help="Paths use only edges with |weight| at least this (0: every edge; thousands of paths).",
)
@click.option("--limit", type=int, default=15, show_default=True, help="Rows per table.")
@click.option("--timeout", "timeout_s", type=float, default=1800, show_default=True)
def demo(
    n_prompts: int,
    home: Path | None,
    fresh: bool,
    max_hops: int,
    min_weight: float,
    limit: int,
    timeout_s: float,
) -> None:
    """Run the whole pipeline on the toy world and answer "all paths from Hand to '5'"."""
    from atlas.services import _proc, neo4j_local, redis_local
    from atlas.settings import AtlasSettings

    user = get_settings()
    home = (home or user.atlas_home / "demo").resolve()
    if home == user.atlas_home.resolve() or home == user.local_neo4j_home.resolve():
        raise ConfigError(f"the demo home {home} would share the user's atlas; choose another")
    steps = _Steps()
    workers: list[tuple[str, subprocess.Popen[bytes]]] = []
    neo4j_home = home / "neo4j"
    redis_dir = home / "redis"
    started_neo4j = started_redis = False
    driver = None
    try:
        with steps.step("toy world"):
            from atlas.toy import toy_paths

            toy = toy_paths(user.atlas_home)
            click.echo(f"    model {toy.model_dir}\n    transcoders {toy.transcoder_dir}", err=True)

        with steps.step(f"local Neo4j and Redis in {home}"):
            # the demo's own services: one left over from an interrupted demo is reused, and
            # everything in the demo home is stopped at the end
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

        from workers.app import make_celery

        app = make_celery(settings)
        with steps.step("workers (attribute + ingest)"):
            workers = _start_workers(settings, home / "logs")
            _wait_workers_ready(app, workers, home / "logs", timeout_s=300)

        from atlas.cli.jobs import JobProgress, wait_showing
        from atlas.pipeline.payloads import PromptSpec
        from atlas.pipeline.submit import submit
        from atlas.store.connection import open_driver
        from atlas.toy.demo import demo_prompts

        driver = open_driver(settings)
        if fresh:
            with steps.step("wiping the demo atlas (--fresh)"):
                from atlas.store import queries as q

                with driver.session(database=settings.neo4j_database) as session:
                    session.run(q.WIPE_DATABASE).consume()

        prompts = demo_prompts(n_prompts)
        n_hand = sum("hand" in p for p in prompts)
        with steps.step(f"batch of {len(prompts)} prompts ({n_hand} about hands)"):
            specs = [
                PromptSpec(prompt=p, model=str(toy.model_dir), transcoders=str(toy.transcoder_dir))
                for p in prompts
            ]
            with JobProgress(bar=False) as view:
                job_id, _ = submit(
                    settings, specs, source="atlas demo", driver=driver, progress=view
                )
            t_batch = time.monotonic()
            summary = wait_showing(
                settings, driver, job_id, timeout_s=timeout_s, requeue_after_s=300.0
            )
            batch_s = time.monotonic() - t_batch
            click.echo(
                f"    job {job_id}: {summary.done} done, {summary.failed} failed; "
                f"{summary.done / max(batch_s, 1e-6) * 60:.0f} prompts/min",
                err=True,
            )

        with steps.step("labelling features (logit lens + top activating tokens)"):
            from atlas.pipeline.payloads import AnnotatePayload

            payload = AnnotatePayload(model=str(toy.model_dir), transcoders=str(toy.transcoder_dir))
            res = app.send_task(ANNOTATE_TASK, args=[payload.model_dump(mode="json")]).get(
                timeout=timeout_s
            )
            click.echo(f"    {res}", err=True)

        with steps.step(f"supernode {HAND}: features whose labels mention hand/finger"):
            from atlas.store.supernodes import define_from_label

            n_members = define_from_label(
                driver, HAND, HAND_PATTERN, database=settings.neo4j_database
            )
            click.echo(f"    {n_members} features (label =~ {HAND_PATTERN!r})", err=True)
            if n_members == 0:
                raise AtlasError("no feature label mentions hand/finger: nothing to trace")

        with steps.step("querying the atlas"):
            stats = _print_answer(driver, settings, max_hops, min_weight, limit)
            from atlas.store.read import count_prompts

            in_atlas = count_prompts(driver, database=settings.neo4j_database)
        click.echo(
            f"\ndemo: {summary.done} prompts done by this batch, {in_atlas} in the atlas; "
            f"{stats['n_paths']} paths "
            f"Hand -> '{TARGET}' over {stats['n_routes']} routes; total {steps.total:.0f}s",
            err=True,
        )
    finally:
        if driver is not None:
            driver.close()
        if workers:
            _stop_workers(workers)
        if started_redis:
            redis_local.stop(redis_dir)
        if started_neo4j:
            neo4j_local.stop(home=neo4j_home)
