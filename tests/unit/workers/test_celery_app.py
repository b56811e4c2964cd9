"""Every Celery app the project builds knows every pipeline task, and every task has a route
(no broker needed: building an app does not contact Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from fnmatch import fnmatch

from atlas.settings import AtlasSettings
from tests import REPO_ROOT

PIPELINE_TASKS = {
    "atlas.attribute",
    "atlas.ingest",
    "atlas.annotate",
    "atlas.ping",
    "atlas.gpu.intervene",
}


def _settings() -> AtlasSettings:
    return AtlasSettings(_env_file=None, redis_url="redis://127.0.0.1:1/0")  # type: ignore[call-arg]


def _own(names: object) -> set[str]:
    return {n for n in names if isinstance(n, str) and not n.startswith("celery.")}  # type: ignore[attr-defined]


def test_an_app_built_by_workers_app_knows_every_pipeline_task() -> None:
    from workers.app import (
        ANNOTATE_TASK,
        ATTRIBUTE_TASK,
        INGEST_TASK,
        INTERVENE_TASK,
        PING_TASK,
        make_celery,
    )

    app = make_celery(_settings())
    assert {ATTRIBUTE_TASK, INGEST_TASK, ANNOTATE_TASK, PING_TASK, INTERVENE_TASK} == PIPELINE_TASKS
    assert _own(app.tasks) == PIPELINE_TASKS
    assert app.atlas_settings.redis_url == "redis://127.0.0.1:1/0"


def test_celery_a_workers_app_and_workers_tasks_are_one_app() -> None:
    """What ``celery -A workers.app`` and ``celery -A workers.tasks`` load: the same object,
    with every task (the smoke worker and the pipeline worker cannot differ)."""
    code = (
        "import workers.app as a, workers.tasks as t\n"
        "assert a.app is t.app\n"
        "print(sorted(n for n in a.app.tasks if not n.startswith('celery.')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))}
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(PIPELINE_TASKS))


def test_every_registered_task_has_a_route_and_gpu_tasks_go_to_the_gpu_queue() -> None:
    from workers.app import ATTRIBUTE_QUEUE, GPU_TASK_PREFIX, INGEST_QUEUE, TASK_ROUTES, make_celery

    app = make_celery(_settings())
    for name in _own(app.tasks):
        assert any(fnmatch(name, pattern) for pattern in TASK_ROUTES), f"{name} has no route"
    router = app.amqp.router
    queue = {n: router.route({}, n)["queue"].name for n in PIPELINE_TASKS}
    assert queue == {
        "atlas.attribute": ATTRIBUTE_QUEUE,
        "atlas.annotate": ATTRIBUTE_QUEUE,
        "atlas.ingest": INGEST_QUEUE,
        "atlas.ping": INGEST_QUEUE,
        "atlas.gpu.intervene": ATTRIBUTE_QUEUE,
    }
    # any task that runs the model routes to the GPU queue by its name alone
    assert router.route({}, f"{GPU_TASK_PREFIX}intervene")["queue"].name == ATTRIBUTE_QUEUE


def test_call_sites_use_the_queue_and_task_constants() -> None:
    """No queue or task name literal outside workers/app.py (the constants' one home)."""
    literals = ['"atlas.attribute"', '"atlas.ingest"', '"atlas.annotate"', '"attribute,ingest"']
    literals += ['queue="attribute"', 'queue="ingest"']
    sites = ["atlas/cli/jobs.py", "atlas/cli/worker.py", "atlas/cli/demo.py", "workers/tasks.py"]
    sites += ["atlas/demo/services.py", "atlas/demo/text.py", "atlas/demo/run.py"]
    sites += ["dev/services_demo.py"]
    sites += ["atlas/pipeline/submit.py", "atlas/pipeline/steps.py", "bench/pipeline.py"]
    for site in sites:
        text = (REPO_ROOT / site).read_text()
        found = [lit for lit in literals if lit in text]
        assert not found, f"{site}: {found}"
