"""Interventions through a real worker and Redis: the prompt attributed and stored by the
pipeline, a supernode on its features, intervention jobs run by the worker's
``atlas.gpu.intervene``, stored, found by the named query, idempotent when re-run, and a bad
item in a batch failing alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import REPO_ROOT

pytestmark = pytest.mark.timeout(900)

GOLDEN = REPO_ROOT / "tests" / "golden" / "gemma2_jumprelu"
PROMPT = "The cat sat"


def _count(driver: Any, query: str, **params: Any) -> int:
    with driver.session() as session:
        return int(session.run(query, **params).single()[0])


def _stored_prompt(settings: Any, driver: Any) -> str:
    """Attribute and ingest the prompt through the worker; its prompt id."""
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import submit, wait_for_job

    spec = PromptSpec(
        prompt=PROMPT, model=str(GOLDEN / "model"), transcoders=str(GOLDEN / "transcoders")
    )
    job, _ = submit(settings, [spec], source="test", driver=driver)
    summary = wait_for_job(settings, driver, job, timeout_s=300)
    assert summary.done == 1, summary
    with driver.session() as s:
        return str(s.run("MATCH (p:Prompt) RETURN p.id AS id").single()["id"])


def _hand_supernode(driver: Any, prompt_id: str) -> None:
    """A supernode of the stored prompt's layer-0 features."""
    from atlas.store.supernodes import define

    with driver.session() as s:
        fids = [
            r["fid"]
            for r in s.run(
                "MATCH (:Node:FeatureNode {prompt: $pid})-[:OF]->(f:Feature) "
                "WHERE f.fid CONTAINS '/0/' RETURN DISTINCT f.fid AS fid",
                pid=prompt_id,
            )
        ]
    assert fids
    define(driver, "hand", fids[:3])


def _run(settings: Any, driver: Any, specs: list[Any]) -> Any:
    from atlas.pipeline.interventions import submit_interventions
    from atlas.pipeline.submit import wait_for_job

    job = submit_interventions(settings, driver, specs)
    return wait_for_job(settings, driver, job, timeout_s=300)


def test_intervention_jobs_on_a_worker(
    celery_worker: Any, service_settings: Any, clean_neo4j: Any
) -> None:
    from atlas.pipeline.intervention_payloads import parse_intervention
    from atlas.store.interventions import interventions, interventions_by_id
    from atlas.store.schema import apply_schema

    driver = clean_neo4j
    apply_schema(driver)
    pid = _stored_prompt(service_settings, driver)
    _hand_supernode(driver, pid)
    refs = {"model": str(GOLDEN / "model"), "transcoders": str(GOLDEN / "transcoders")}
    good = parse_intervention(
        refs | {"prompt": PROMPT, "supernode": {"name": "hand", "multiplier": 0.0}, "store": True}
    )
    bad = parse_intervention(
        refs
        | {"prompt": PROMPT, "edits": [{"layer": 0, "pos": 1, "feature": 100000}], "store": True}
    )
    summary = _run(service_settings, driver, [good, bad])
    assert (summary.done, summary.failed) == (1, 1), summary

    rows = interventions(driver, supernode="hand")
    assert [r["id"] for r in rows] == [good.content_id()]
    by_id = interventions_by_id(driver, [good.content_id(), "iv-not-stored"])
    assert [r["id"] for r in by_id] == [good.content_id()]
    assert rows[0]["prompt_id"] == pid and rows[0]["kl"] is not None
    assert rows[0]["predicted"] is not None  # the worker found the prompt's graph
    on = "MATCH (:Intervention {id: $id})-[:ON]->(:Prompt {id: $pid}) RETURN count(*)"
    assert _count(driver, on, id=good.content_id(), pid=pid) == 1
    touches = "MATCH (:Intervention {id: $id})-[:TOUCHES]->(f:Feature) RETURN count(f)"
    assert _count(driver, touches, id=good.content_id()) == 3

    # a retry sends the failed item again as an intervention (and it fails again, alone)
    out = _console(["jobs", "retry", summary.job_id, "--wait"], service_settings)
    assert "re-sending 1 items" in out.stderr, out.stderr
    assert out.returncode == 1, out.stderr
    again = _run(service_settings, driver, [good])
    assert again.done == 1, again
    assert _count(driver, "MATCH (i:Intervention) RETURN count(i)") == 1

    out = _console(
        ["query", "interventions", "--supernode", "hand", "--format", "json"], service_settings
    )
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [good.content_id()]

    # the faithfulness report of the stored prompt: printed, stored, in the named query
    out = _console(["validate", pid, "--n-sources", "3", "--format", "json"], service_settings)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_sources"] == 3 and report["n_pairs"] > 0
    out = _console(["query", "faithfulness", pid, "--format", "json"], service_settings)
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["prompt_id"] == pid and row["spearman"] == report["spearman"]


def test_intervention_items_of_a_lost_worker_are_sent_again(
    celery_worker: Any, service_settings: Any, clean_neo4j: Any
) -> None:
    """Intervention items held by a worker that died (no message left, heartbeat stopped) show
    as stale, and ``wait_for_job`` sends them again as interventions; each runs once more."""
    import time

    from atlas.pipeline.intervention_payloads import INTERVENE_SOURCE, parse_intervention
    from atlas.pipeline.submit import job_store, wait_for_job
    from atlas.store.jobs import ensure_job_schema, new_job_id

    driver = clean_neo4j
    settings = service_settings.model_copy(
        update={"heartbeat_interval_s": 0.5, "stale_after_s": 1.5}
    )
    ensure_job_schema(driver, settings.neo4j_database)
    refs = {"model": str(GOLDEN / "model"), "transcoders": str(GOLDEN / "transcoders")}
    specs = [
        parse_intervention(
            refs
            | {"prompt": PROMPT, "edits": [{"layer": 0, "pos": 1, "feature": f, "mode": "ablate"}]}
        )
        for f in (1, 2)
    ]
    store = job_store(driver, settings)
    job = new_job_id()
    store.create(
        job,
        [s.model_dump(mode="json") for s in specs],
        [s.content_id() for s in specs],
        source=INTERVENE_SOURCE,
        mode="celery",
    )
    store.hold(job, [0, 1], "gone-host:1")  # taken by a worker that died: no message left
    time.sleep(2.0)
    assert store.summary(job).stale == 2
    summary = wait_for_job(settings, driver, job, timeout_s=240, poll_s=0.5)
    assert (summary.done, summary.failed) == (2, 0), celery_worker.log_text()[-3000:]
    assert all(it.attempts >= 1 for it in store.items(job))


def _console(args: list[str], settings: Any) -> subprocess.CompletedProcess[str]:
    """The real console script with the test services' settings."""
    from tests.servers import subprocess_env

    script = Path(sys.executable).with_name("atlas")
    env = subprocess_env(settings, drop=("NEO4J_", "REDIS_"))
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
