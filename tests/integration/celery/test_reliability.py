"""What a new user's audit broke, against the real services: a real Neo4j, real Redis servers
(one with a password), real ``atlas worker`` processes killed as a whole, and the real console
script (``.venv/bin/atlas``) for everything a user sees.

* lost workers: a worker whose process group is SIGKILLed mid-chunk gets its prompts back through
  the next worker's reaper (heartbeats on the job items), not the 6-hour visibility timeout; the
  ``--wait`` loop re-sends them too; a killed inline batch is stale and retryable;
* secrets and broker faults: no password in any message, a refused password said in one line at
  once, and no job left queued by a send that failed;
* a corrupt cached artifact is moved aside and recomputed;
* a batch file's bad lines are all reported, and ``--skip-bad-lines`` records them as failed;
* every user error is one line, and the prompt is checked before the weights load.

Waits have deadlines; the kill points are made deterministic by the tests' pause hook
(``ATLAS_TEST_PAUSE_DIR``), never by polling for a window.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas.errors import AuthError, InputError, ServiceUnavailable
from atlas.services import _proc
from tests import REPO_ROOT
from tests.helpers import build_tiny_world

SCRIPT = Path(sys.executable).with_name("atlas")
#: Settings a test's processes get so that a lost holder is noticed in seconds.
FAST_LIVENESS = {"HEARTBEAT_INTERVAL_S": "0.5", "STALE_AFTER_S": "3"}


# --------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(model dir, transcoder dir) of a tiny seeded Llama (character-level tokenizer)."""
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A Redis of this test's own (its queues hold nothing of anybody else's)."""
    from atlas.services import redis_local

    directory = tmp_path / "redis"
    server = redis_local.start(directory, die_with_parent=True)
    yield server
    redis_local.stop(directory)


@pytest.fixture()
def pause_dir(tmp_path: Path) -> Path:
    """The pause hook's directory, with the pause on."""
    directory = tmp_path / "pause"
    directory.mkdir()
    (directory / "pause").touch()
    return directory


def _env(settings: Any, **extra: str) -> dict[str, str]:
    """The environment of a user's shell for these settings (nothing inherited that counts)."""
    prefixes = ("NEO4J_", "REDIS_", "CELERY_", "ATLAS_", "HEARTBEAT_", "STALE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "ATLAS_HOME": str(settings.atlas_home),
        "NEO4J_URI": settings.neo4j_uri or "",
        "NEO4J_USER": settings.neo4j_user,
        "NEO4J_PASSWORD": settings.neo4j_password.get_secret_value(),
        "REDIS_URL": settings.redis_url or "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    return env | extra


def _console(args: list[str], env: dict[str, str], timeout_s: float = 300) -> Any:
    assert SCRIPT.is_file(), SCRIPT
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _count(driver: Any, query: str, **params: Any) -> int:
    with driver.session() as session:
        return int(session.run(query, **params).single()[0])


def _prompt_copies(driver: Any, prompt_id: str) -> int:
    return _count(driver, "MATCH (p:Prompt {id: $id}) RETURN count(p)", id=prompt_id)


def _specs(world: tuple[str, str], prompts: list[str]) -> list[Any]:
    from atlas.pipeline.payloads import PromptSpec

    return [PromptSpec(prompt=p, model=world[0], transcoders=world[1]) for p in prompts]


def _create_celery_job(store: Any, job: str, specs: list[Any]) -> None:
    """Record ``job`` (Celery mode) with an item per spec, as ``submit`` would."""
    store.create(
        job,
        [s.model_dump(mode="json") for s in specs],
        [s.spec_id() for s in specs],
        source="test",
        mode="celery",
    )


def _wait_for(predicate: Any, timeout_s: float, what: str, log: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:.0f} s\n{log() if log else ''}")
        time.sleep(0.1)


class GroupWorker:
    """``atlas worker`` (prefork pool) in a process group of its own, so a test can SIGKILL the
    whole worker, main process and pool, as a lost machine or an OOM killer would."""

    def __init__(self, settings: Any, env: dict[str, str], log: Path) -> None:
        self.hostname = f"atlas-rel-{uuid.uuid4().hex[:8]}@localhost"
        self.log = log
        argv = [str(SCRIPT), "worker", "--pool", "prefork", "-c", "1", "--name", self.hostname]
        with log.open("wb") as handle:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.settings = settings

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        from workers.app import make_celery

        app = make_celery(self.settings)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            if app.control.ping(destination=[self.hostname], timeout=1.0):
                return
        raise AssertionError(f"worker not ready in {timeout_s:.0f} s\n{self.log_text()}")

    def kill_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- lost workers
def test_worker_killed_as_a_group_mid_chunk_is_reaped_by_the_next_worker(
    tmp_path: Path,
    clean_neo4j: Any,
    neo4j_settings: Any,
    own_redis: Any,
    pause_dir: Path,
    tiny_world: tuple[str, str],
) -> None:
    """SIGKILL of a worker's whole process group mid-chunk: no ack, no clean-up, its message
    stays with Redis for the 6-hour visibility timeout. The next worker's reaper finds the items
    whose heartbeat stopped and sends them again; every prompt is stored exactly once, in
    minutes."""
    from atlas.pipeline.submit import submit
    from atlas.store.jobs import JobStore

    driver = clean_neo4j
    settings = neo4j_settings.model_copy(
        update={"redis_url": own_redis.url, "heartbeat_interval_s": 0.5, "stale_after_s": 3.0}
    )
    assert settings.celery_visibility_timeout_s >= 3600  # the broker will not help in time
    env = _env(settings, **FAST_LIVENESS, ATLAS_TEST_PAUSE_DIR=str(pause_dir))
    first = GroupWorker(settings, env, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        prompts = ["a hand has", "the cat sat", "one more here"]
        job, _ = submit(settings, _specs(tiny_world, prompts), source="test", driver=driver)
        store = JobStore(driver, settings.neo4j_database, stale_after_s=settings.stale_after_s)
        _wait_for(lambda: list(pause_dir.glob("held-*")), 180, "chunk claimed", first.log_text)
        held = store.items(job)
        assert {i.state for i in held} == {"attributing"}
        assert len({i.worker for i in held}) == 1 and held[0].worker

        first.kill_group()  # main process and pool child together
        killed_at = time.monotonic()
        _wait_for(lambda: not _group_alive(first.proc.pid), 30, "worker group gone")
        (pause_dir / "pause").unlink()
        _wait_for(lambda: store.summary(job).stale == 3, 30, "items stale")

        second = GroupWorker(settings, env, tmp_path / "second.log")
        second.wait_ready()
        # no --wait loop here: the second worker's reaper alone must bring the work back
        _wait_for(lambda: store.summary(job).finished, 240, "job finished", second.log_text)
        assert time.monotonic() - killed_at < 300
    finally:
        first.stop()
        if second is not None:
            second.stop()
    summary = store.summary(job)
    assert (summary.done, summary.failed, summary.stale) == (3, 0, 0)
    for item in store.items(job):
        assert item.attempts >= 2  # the killed claim and the re-sent one
        assert _prompt_copies(driver, item.prompt_id or "") == 1
    assert _count(driver, "MATCH (p:Prompt) RETURN count(p)") == 3
    # the second worker's reaper, not a broker redelivery, brought every item back: the broker
    # would wait out the 6-hour visibility timeout, and every item was claimed twice within the
    # 300 s above. The reaper's log line is not required: a worker stopped with SIGTERM may not
    # have flushed its log file when it is read.


def test_wait_resends_items_whose_holder_stopped_beating(
    clean_neo4j: Any, service_settings: Any, celery_worker: Any, tiny_world: tuple[str, str]
) -> None:
    """``--wait`` (``wait_for_job``) re-sends a Celery job's stale items itself."""
    from atlas.pipeline.submit import job_store, wait_for_job
    from atlas.store.jobs import ensure_job_schema, new_job_id

    driver = clean_neo4j
    settings = service_settings.model_copy(
        update={"heartbeat_interval_s": 0.5, "stale_after_s": 1.5}
    )
    ensure_job_schema(driver, settings.neo4j_database)
    specs = _specs(tiny_world, ["held by the dead", "also held"])
    store = job_store(driver, settings)
    job = new_job_id()
    _create_celery_job(store, job, specs)
    store.hold(job, [0, 1], "gone-host:1")  # a worker that took them and died: no message
    time.sleep(2.0)
    assert store.summary(job).stale == 2
    summary = wait_for_job(settings, driver, job, timeout_s=240, poll_s=0.5)
    assert (summary.done, summary.failed) == (2, 0), celery_worker.log_text()[-3000:]
    for item in store.items(job):
        assert _prompt_copies(driver, item.prompt_id or "") == 1


def test_killed_inline_batch_prints_its_id_first_and_is_stale_and_retryable(
    tmp_path: Path,
    clean_neo4j: Any,
    neo4j_settings: Any,
    pause_dir: Path,
    tiny_world: tuple[str, str],
) -> None:
    """An inline ``atlas batch`` prints its job id before running; SIGKILLed mid-batch, its
    items show as stale in ``atlas jobs status`` and ``atlas jobs retry`` runs them."""
    driver = clean_neo4j
    model, tcs = tiny_world
    lines = [{"prompt": p, "model": model, "transcoders": tcs} for p in ("hello a", "hello b")]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = _env(neo4j_settings, **FAST_LIVENESS, ATLAS_TEST_PAUSE_DIR=str(pause_dir))
    out_path = tmp_path / "batch.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "batch", str(batch)],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: list(pause_dir.glob("held-*")), 180, "inline batch paused")
        job = out_path.read_text().strip()
        assert job, "the job id is printed before the prompts run"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (pause_dir / "pause").unlink()
    time.sleep(float(FAST_LIVENESS["STALE_AFTER_S"]) + 1.0)

    env.pop("ATLAS_TEST_PAUSE_DIR")
    status = _console(["jobs", "status", job], env)
    assert status.returncode == 0, status.stderr
    assert "2 stale" in status.stdout and "atlas jobs retry" in status.stdout, status.stdout
    assert status.stdout.count(" stale ") >= 2  # each stale item listed as such

    retry = _console(["jobs", "retry", job], env)
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert "re-sending 2 items" in retry.stderr
    assert "2 done, 0 failed of 2" in retry.stderr
    with driver.session() as session:
        pids = [r["p"] for r in session.run("MATCH (p:Prompt) RETURN p.id AS p")]
    assert len(pids) == 2 and all(_prompt_copies(driver, p) == 1 for p in pids)


# --------------------------------------------------------------------------- secrets, broker faults
@pytest.fixture()
def password_redis(tmp_path: Path) -> Iterator[Any]:
    """A Redis that requires a password."""
    from atlas.services import redis_local

    directory = tmp_path / "redis-auth"
    server = redis_local.start(directory, die_with_parent=True, password="right-pass-123")
    yield server
    redis_local.stop(directory)


def _jobs_in(driver: Any) -> int:
    return _count(driver, "MATCH (j:Job) RETURN count(j)")


def test_wrong_redis_password_is_one_line_at_once_and_leaves_no_job(
    clean_neo4j: Any, neo4j_settings: Any, password_redis: Any
) -> None:
    port = password_redis.port
    wrong = f"redis://:wrong-pass-456@127.0.0.1:{port}/0"
    env = _env(neo4j_settings, REDIS_URL=wrong)
    expected = f"error: Redis at redis://***@127.0.0.1:{port}/0 refused the password"
    for args in (["enqueue", "a hand has"], ["worker"]):
        t0 = time.monotonic()
        out = _console(args, env)
        elapsed = time.monotonic() - t0
        assert out.returncode != 0
        assert _lines(out.stderr) == [expected], out.stderr
        assert "wrong-pass-456" not in out.stdout + out.stderr
        assert elapsed < 20, elapsed  # said at once, not after the client's retries
    assert _jobs_in(clean_neo4j) == 0

    from atlas.services.redis_local import check_reachable

    with pytest.raises(AuthError, match="refused the password"):
        check_reachable(wrong)
    check_reachable(password_redis.url)  # the right one answers


def test_unreachable_redis_and_neo4j_never_show_their_passwords(
    clean_neo4j: Any, neo4j_settings: Any
) -> None:
    port = _proc.free_port()
    env = _env(neo4j_settings, REDIS_URL=f"redis://:top-secret-1@127.0.0.1:{port}/0")
    out = _console(["enqueue", "a hand has"], env)
    assert out.returncode != 0
    (line,) = _lines(out.stderr)
    assert line.startswith(f"error: Redis at redis://***@127.0.0.1:{port}/0 is not reachable")
    assert "top-secret-1" not in out.stdout + out.stderr
    assert _jobs_in(clean_neo4j) == 0  # checked before the job was recorded

    env = _env(neo4j_settings, NEO4J_URI=f"bolt://neo4j:top-secret-2@127.0.0.1:{port}")
    out = _console(["jobs", "list"], env)
    assert out.returncode != 0
    assert len(_lines(out.stderr)) == 1, out.stderr
    assert "top-secret-2" not in out.stdout + out.stderr


def test_a_send_that_fails_marks_the_unsent_items_failed(
    clean_neo4j: Any, neo4j_settings: Any
) -> None:
    """Recorded, then the send fails: the items are failed with the reason, never left queued
    for messages that do not exist (and ``atlas jobs retry`` can send them)."""
    from atlas.pipeline.payloads import AttributePayload, PromptSpec
    from atlas.pipeline.submit import job_store, retry_items, send_or_fail
    from atlas.store.jobs import ensure_job_schema, new_job_id

    driver = clean_neo4j
    ensure_job_schema(driver, neo4j_settings.neo4j_database)
    down = neo4j_settings.model_copy(
        update={"redis_url": f"redis://:pw-789@127.0.0.1:{_proc.free_port()}/0"}
    )
    specs = [PromptSpec(prompt="a cat"), PromptSpec(prompt="a dog")]
    store = job_store(driver, down)
    job = new_job_id()
    _create_celery_job(store, job, specs)
    payloads = [AttributePayload(spec=s, job_id=job, item=i) for i, s in enumerate(specs)]
    with pytest.raises(ServiceUnavailable) as info:
        send_or_fail(down, driver, job, payloads)
    assert "pw-789" not in str(info.value)
    summary = store.summary(job)
    assert (summary.failed, summary.queued) == (2, 0)
    reasons = {i.reason for i in store.items(job)}
    assert len(reasons) == 1 and (reasons.pop() or "").startswith("not sent: Redis at redis://***@")
    assert [i.idx for i in retry_items(driver, down, job, None)] == [0, 1]


def test_cli_logging_keeps_service_retries_quiet_and_redacts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from click.testing import CliRunner

    from atlas.cli import cli

    result = CliRunner().invoke(cli, ["jobs", "--help"])
    assert result.exit_code == 0
    for name in ("neo4j", "neo4j.notifications", "kombu"):
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
    with caplog.at_level(logging.WARNING):
        logging.getLogger("atlas.test").warning("broker at %s", "redis://:hunter2@h:6379/0")
    assert "redis://***@h:6379/0" in caplog.text and "hunter2" not in caplog.text


# --------------------------------------------------------------------------- corrupt artifacts
def test_corrupt_cached_artifact_is_quarantined_and_recomputed(
    clean_neo4j: Any,
    neo4j_settings: Any,
    tiny_world: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from atlas.graph import Graph, artifact_path
    from atlas.pipeline.submit import job_store, submit
    from atlas.store.ingest import delete_prompt

    driver = clean_neo4j
    settings = neo4j_settings
    specs = _specs(tiny_world, ["a corrupt one", "a garbled one"])
    job, _ = submit(settings, specs, source="test", driver=driver)
    items = job_store(driver, settings).items(job)
    paths = [artifact_path(settings.resolved_artifact_dir, i.prompt_id or "") for i in items]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated
    paths[1].write_bytes(b"\x00garbage" * 64)  # garbled
    for item in items:  # not in the atlas any more: the cached artifacts are what is left
        delete_prompt(driver, item.prompt_id or "", database=settings.neo4j_database)

    with caplog.at_level(logging.WARNING, logger="atlas.pipeline.steps"):
        job2, _ = submit(settings, specs, source="test", driver=driver, force=False)
    summary = job_store(driver, settings).summary(job2)
    assert (summary.done, summary.failed) == (2, 0)
    assert [i.outcome for i in job_store(driver, settings).items(job2)] == ["computed"] * 2
    warnings = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in r.getMessage() for r in warnings)
    for item, path in zip(items, paths, strict=True):
        assert Graph.load(path).prompt_id == item.prompt_id
        assert _prompt_copies(driver, item.prompt_id or "") == 1
    assert len(list((settings.resolved_artifact_dir / "quarantine").iterdir())) == 2


# --------------------------------------------------------------------------- batch files
def _bad_batch(tmp_path: Path, world: tuple[str, str]) -> Path:
    model, tcs = world
    good = [json.dumps({"prompt": p, "model": model, "transcoders": tcs}) for p in ("ab", "cd")]
    lines = [
        good[0],
        '{"prompt": "broken"',
        good[1],
        json.dumps({"prompt": "x", "colour": 1}),
        "",
        json.dumps({"prompt": "   "}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_line_is_reported_and_nothing_runs_by_default(
    tmp_path: Path, clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    from atlas.pipeline.submit import BatchFileError, parse_batch_file

    path = _bad_batch(tmp_path, tiny_world)
    with pytest.raises(BatchFileError) as info:
        parse_batch_file(path)
    assert [b.lineno for b in info.value.bad] == [2, 4, 6]

    out = _console(["batch", str(path)], _env(neo4j_settings))
    assert out.returncode != 0
    lines = _lines(out.stderr)
    assert len(lines) == 4, lines  # one per bad line, then the summary
    assert f"{path}:2: not valid JSON" in lines[0]
    assert f"{path}:4: colour:" in lines[1]
    assert f"{path}:6: prompt: prompt is empty" in lines[2]
    assert "3 of 5 lines are bad; nothing was run" in lines[3]
    assert _jobs_in(clean_neo4j) == 0


def test_skip_bad_lines_runs_the_good_ones_and_records_the_bad_as_failed(
    tmp_path: Path, clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    from atlas.pipeline.submit import job_store

    path = _bad_batch(tmp_path, tiny_world)
    env = _env(neo4j_settings)
    out = _console(["batch", str(path), "--skip-bad-lines"], env)
    assert out.returncode == 1, out.stderr[-2000:]
    job = _lines(out.stdout)[0]
    store = job_store(clean_neo4j, neo4j_settings)
    items = store.items(job)
    assert [i.state for i in items] == ["done", "failed", "done", "failed", "failed"]
    bad = [i for i in items if i.state == "failed"]
    assert [i.spec["line"] for i in bad] == [2, 4, 6]
    assert all(f"{path}:{i.spec['line']}:" in (i.reason or "") for i in bad)

    retry = _console(["jobs", "retry", job], env)  # a bad line cannot run again as it is
    assert "re-sending 0 items" in retry.stderr


# --------------------------------------------------------------------------- one-line errors
def _broken_weights(world: tuple[str, str], tmp_path: Path) -> str:
    """A copy of the tiny model whose weights cannot load (config and tokenizer intact)."""
    import shutil

    model = tmp_path / "broken-model"
    shutil.copytree(world[0], model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return str(model)


def test_user_errors_are_one_line_through_the_console_script(
    tmp_path: Path, clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    model, tcs = tiny_world
    env = _env(neo4j_settings)
    attribute = ["attribute", "--model", model, "--transcoders", tcs, "--out", str(tmp_path)]
    broken = _broken_weights(tiny_world, tmp_path)
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["enqueue", "   "], {}, "prompt is empty"),
        ([*attribute, "--prompt", "  \t "], {}, "prompt is empty"),
        (
            ["enqueue", "hi", "--max-n-logits", "0", "--node-threshold", "5"],
            {},
            "max_n_logits: must be at least 1",
        ),
        (
            [
                "attribute",
                "--model",
                "/nonexistent/model-dir",
                "--transcoders",
                tcs,
                "--prompt",
                "hi",
                "--out",
                str(tmp_path),
            ],
            {},
            "model directory /nonexistent/model-dir does not exist",
        ),
        # the prompt is refused by the tokenizer before the (broken) weights would load
        (
            [*attribute[:1], "--model", broken, *attribute[3:], "--prompt", "x" * 1000],
            {},
            "more than the limit",
        ),
        (["jobs", "list"], {"DTYPE": "int8"}, "bad settings: DTYPE:"),
    ]
    for args, extra, expected in cases:
        out = _console(args, env | extra)
        assert out.returncode != 0, (args, out.stderr)
        lines = _lines(out.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, out.stderr[-2000:])
    out = _console(["enqueue", "hi", "--max-n-logits", "0", "--node-threshold", "5"], env)
    assert "node_threshold" in out.stderr  # every bad field, in the one line


def test_pipeline_checks_the_prompt_and_the_model_directory_first(
    tmp_path: Path, clean_neo4j: Any, neo4j_settings: Any, tiny_world: tuple[str, str]
) -> None:
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import job_store, submit

    broken = _broken_weights(tiny_world, tmp_path)
    tcs = tiny_world[1]
    specs = [
        PromptSpec(prompt="x" * 1000, model=broken, transcoders=tcs),
        PromptSpec(prompt="hi", model="/nonexistent/model-dir", transcoders=tcs),
    ]
    job, _ = submit(neo4j_settings, specs, source="test", driver=clean_neo4j)
    reasons = [i.reason or "" for i in job_store(clean_neo4j, neo4j_settings).items(job)]
    assert "more than the limit" in reasons[0], reasons
    assert reasons[1] == "model directory /nonexistent/model-dir does not exist"
    with pytest.raises(InputError, match="prompt is empty"):
        from atlas.engine import check_prompt

        check_prompt(" \n ", tiny_world[0])
