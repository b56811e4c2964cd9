"""``make smoke``: the services end to end.

Starts the local Neo4j (unless NEO4J_URI is set or it already runs) and a local redis-server
(unless REDIS_URL is set), runs ``atlas db init``, round-trips the ``atlas.ping`` task through a
real Celery worker, prints one line, and stops whatever it started.

The worker listens on a queue of its own (``atlas-smoke-<pid>``), never on the pipeline's: with
``REDIS_URL`` pointing at a live broker, a smoke run must not take messages meant for the
pipeline's workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from atlas.errors import AtlasError
    from atlas.services import neo4j_local, redis_local
    from atlas.settings import AtlasSettings
    from workers.app import make_celery, ping

    queue = f"atlas-smoke-{os.getpid()}"
    settings = AtlasSettings()
    started_neo4j = False
    redis_dir: Path | None = None
    worker: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    try:
        if settings.uses_local_neo4j and not neo4j_local.status(settings).running:
            neo4j_local.start(settings, progress=lambda m: print(f"[demo] {m}", file=sys.stderr))
            started_neo4j = True
        if not settings.redis_url:
            redis_dir = settings.atlas_home / "redis"
            server = redis_local.start(redis_dir)
            settings = settings.model_copy(update={"redis_url": server.url})
            print(f"[demo] redis-server at {server.url}", file=sys.stderr)
        env = {**os.environ, "REDIS_URL": settings.redis_url or ""}
        subprocess.run([sys.executable, "-m", "atlas", "db", "init"], env=env, check=True)
        log = settings.atlas_home / "logs" / "demo-worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[demo] starting a Celery worker (log {log})", file=sys.stderr)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q",
             queue, "-P", "solo", "-c", "1", "-l", "warning",
             "--without-gossip", "--without-mingle", "-n", "atlas-demo@%h"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        app = make_celery(settings, check=True)
        answer = ping(app, payload="hello", timeout_s=120, queue=queue)
        print(
            f"demo ok: Neo4j at {settings.resolved_neo4j_uri} initialised; task atlas.ping "
            f"answered {answer['pong']!r} from worker pid {answer['pid']} via "
            f"{settings.redis_url} in {time.monotonic() - t0:.1f} s"
        )
        return 0
    except AtlasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd))} failed with {exc.returncode}", file=sys.stderr)
        return 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        if redis_dir is not None:
            redis_local.stop(redis_dir)
        if started_neo4j:
            neo4j_local.stop(settings)


if __name__ == "__main__":
    sys.exit(main())
