"""docker-compose.yml stays consistent with the code: services, ports, volumes, env names."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from atlas.settings import AtlasSettings
from tests import REPO_ROOT
from workers.app import ATTRIBUTE_QUEUE, INGEST_QUEUE

ROOT = REPO_ROOT
WORKERS = ("worker-gpu", "worker-ingest")
#: services that run our image and so read AtlasSettings from the environment
ATLAS_SERVICES = (*WORKERS, "schema-init", "cli")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _settings_env_names() -> set[str]:
    return {name.upper() for name in AtlasSettings.model_fields}


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def _named_volume_targets(service: dict[str, Any]) -> dict[str, str]:
    out = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        if not source.startswith((".", "/")):
            out[source] = target
    return out


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else str(command).split()


def test_expected_services(compose: dict[str, Any]) -> None:
    assert {"neo4j", "redis", *WORKERS, "schema-init"} <= set(compose["services"])


def test_neo4j_service(compose: dict[str, Any]) -> None:
    neo4j = compose["services"]["neo4j"]
    assert re.fullmatch(r"neo4j:5\.26(\.\d+)?-community", neo4j["image"])
    auth = neo4j["environment"]["NEO4J_AUTH"]
    assert "${NEO4J_PASSWORD" in auth and "NEO4J_USER" in auth
    assert 7687 in _container_ports(neo4j)
    assert _named_volume_targets(neo4j).get("neo4j-data") == "/data"
    assert neo4j["healthcheck"]["test"]


def test_redis_service_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = _command(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert 6379 in _container_ports(redis)
    assert _named_volume_targets(redis).get("redis-data") == "/data"
    assert redis["healthcheck"]["test"]


def test_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in _named_volume_targets(service):
            assert volume in declared, f"{name} uses undeclared volume {volume}"


@pytest.mark.parametrize("name", ATLAS_SERVICES)
def test_env_names_are_settings_fields(compose: dict[str, Any], name: str) -> None:
    env = compose["services"][name]["environment"]
    unknown = set(env) - _settings_env_names()
    assert not unknown, f"{name}: env names that AtlasSettings does not read: {unknown}"
    for required in ("NEO4J_URI", "NEO4J_USER", "NEO4J_PASSWORD", "REDIS_URL"):
        assert required in env, f"{name} lacks {required}"


@pytest.mark.parametrize("name", ATLAS_SERVICES)
def test_service_urls_point_at_the_services(compose: dict[str, Any], name: str) -> None:
    services = compose["services"]
    env = services[name]["environment"]
    neo4j = urlparse(env["NEO4J_URI"])
    assert neo4j.scheme in ("bolt", "neo4j")
    assert neo4j.hostname == "neo4j" and neo4j.port in _container_ports(services["neo4j"])
    redis = urlparse(env["REDIS_URL"])
    assert redis.scheme == "redis"
    assert redis.hostname == "redis" and redis.port in _container_ports(services["redis"])
    # and the values parse as settings
    clean = {k: v for k, v in env.items() if "${" not in str(v)}
    settings = AtlasSettings(_env_file=None, **{k.lower(): v for k, v in clean.items()})  # type: ignore[arg-type]
    assert settings.resolved_neo4j_uri == env["NEO4J_URI"]
    assert settings.celery_visibility_timeout_s >= 6 * 3600


def test_gpu_worker_reserves_a_gpu_and_takes_attribution(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    command = _command(worker)
    assert command[0] == "worker"
    assert command[command.index("--queues") + 1] == ATTRIBUTE_QUEUE
    assert worker["healthcheck"]["test"]


def test_ingest_worker_takes_ingest_on_cpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-ingest"]
    assert "deploy" not in worker
    command = _command(worker)
    assert command[0] == "worker"
    assert command[command.index("--queues") + 1] == INGEST_QUEUE
    assert worker["healthcheck"]["test"]


def test_workers_share_the_artifact_volume(compose: dict[str, Any]) -> None:
    env = compose["services"]["worker-gpu"]["environment"]
    targets = [_named_volume_targets(compose["services"][w]) for w in WORKERS]
    assert all(t.get("artifacts") == env["ARTIFACT_DIR"] for t in targets)
    for name in WORKERS:
        depends = compose["services"][name]["depends_on"]
        assert depends["neo4j"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"


def test_image_is_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name in ATLAS_SERVICES:
        build = compose["services"][name]["build"]
        dockerfile = ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file()
    text = (ROOT / "Dockerfile").read_text()
    assert "ENTRYPOINT" in text and '"atlas"' in text
    for path in ("atlas", "workers", "schema", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
