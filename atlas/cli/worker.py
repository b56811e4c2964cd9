"""``atlas worker``: a correctly configured Celery worker for the pipeline (replaces this process)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from atlas.cli import get_settings
from atlas.errors import ConfigError
from workers.app import PIPELINE_QUEUES


def worker_argv(
    *,
    queues: str,
    concurrency: int,
    pool: str,
    loglevel: str,
    hostname: str | None,
    python: str = sys.executable,
) -> list[str]:
    """The celery command line of a correctly configured worker (prefetch 1, late acks)."""
    argv = [
        python,
        "-m",
        "celery",
        "-A",
        "workers.tasks",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "--prefetch-multiplier",
        "1",
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv += ["-n", hostname]
    return argv


@click.command()
@click.option("--gpu", type=int, default=None, help="GPU index: sets CUDA_VISIBLE_DEVICES, -c 1.")
@click.option("--queues", default=PIPELINE_QUEUES, show_default=True, help="Comma-separated.")
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=1,
    show_default=True,
    help="Processes (forced to 1 with --gpu: one process per GPU).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default="prefork",
    show_default=True,
)
@click.option("--threads", type=int, default=None, help="Torch CPU threads per process.")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--name", "hostname", default=None, help="Worker node name (celery -n).")
def worker(
    gpu: int | None,
    queues: str,
    concurrency: int,
    pool: str,
    threads: int | None,
    loglevel: str,
    hostname: str | None,
) -> None:
    """Start a Celery worker for the pipeline (replaces this process).

    One worker process per GPU: ``--gpu N`` sets CUDA_VISIBLE_DEVICES=N before anything imports
    torch and runs one pool process with prefetch 1; models load lazily in that process (after
    the fork), so CUDA is never initialised in the parent.
    """
    from workers.app import check_broker

    settings = get_settings()
    check_broker(settings)  # one line, instead of Celery retrying an absent Redis forever
    # The worker is exec'd below, so nothing this process imported (or initialised) leaks into it.
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        concurrency = 1
        hostname = hostname or f"atlas-gpu{gpu}@%h"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    argv = worker_argv(
        queues=queues, concurrency=concurrency, pool=pool, loglevel=loglevel, hostname=hostname
    )
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise ConfigError(f"python interpreter {argv[0]} not found")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
