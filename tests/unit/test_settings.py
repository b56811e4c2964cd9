"""The one settings object: environment names, defaults, secrets, documentation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from atlas.settings import AtlasSettings
from tests import REPO_ROOT

ROOT = REPO_ROOT
FIELDS = sorted(AtlasSettings.model_fields)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the caller's environment or a stray .env file."""
    for name in FIELDS:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_use_the_embedded_services(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = AtlasSettings()
    assert settings.atlas_home == tmp_path / ".circuit-atlas"
    assert settings.uses_local_neo4j
    assert settings.resolved_neo4j_uri == f"bolt://127.0.0.1:{settings.neo4j_bolt_port}"
    assert settings.neo4j_bolt_port != 7687  # never collides with a real install
    assert settings.local_neo4j_home == settings.atlas_home / "neo4j"
    assert settings.resolved_artifact_dir == settings.atlas_home / "artifacts"
    assert settings.redis_url is None
    assert settings.celery_visibility_timeout_s >= 6 * 3600
    assert settings.neo4j_password.get_secret_value() == ""


def test_every_field_reads_its_upper_case_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEO4J_URI", "bolt://db.example:7687")
    monkeypatch.setenv("NEO4J_USER", "atlas")
    monkeypatch.setenv("NEO4J_PASSWORD", "s3cret-pass")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("ATLAS_HOME", "/srv/atlas")
    monkeypatch.setenv("ARTIFACT_DIR", "/srv/artifacts")
    monkeypatch.setenv("CELERY_VISIBILITY_TIMEOUT_S", "90000")
    monkeypatch.setenv("NEO4J_BOLT_PORT", "17000")
    settings = AtlasSettings()
    assert not settings.uses_local_neo4j
    assert settings.resolved_neo4j_uri == "bolt://db.example:7687"
    assert settings.neo4j_user == "atlas"
    assert isinstance(settings.neo4j_password, SecretStr)
    assert settings.neo4j_password.get_secret_value() == "s3cret-pass"
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.atlas_home == Path("/srv/atlas")
    assert settings.resolved_artifact_dir == Path("/srv/artifacts")
    assert settings.celery_visibility_timeout_s == 90000
    assert settings.neo4j_bolt_port == 17000


def test_password_never_shows_in_repr_or_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEO4J_PASSWORD", "do-not-print-me")
    settings = AtlasSettings()
    assert "do-not-print-me" not in repr(settings)
    assert "do-not-print-me" not in str(settings.model_dump())
    assert "do-not-print-me" not in settings.model_dump_json()


def test_dot_env_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("REDIS_URL=redis://from-dotenv:6379/0\n")
    assert AtlasSettings().redis_url == "redis://from-dotenv:6379/0"


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTYPE", "int8")
    with pytest.raises(ValidationError):
        AtlasSettings()
    monkeypatch.delenv("DTYPE")
    monkeypatch.setenv("NEO4J_BOLT_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        AtlasSettings()


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse((ROOT / "atlas" / "settings.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AtlasSettings")
    documented = set()
    for current, following in zip(cls.body, cls.body[1:], strict=False):
        if (
            isinstance(current, ast.AnnAssign)
            and isinstance(current.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            documented.add(current.target.id)
    assert set(FIELDS) - documented == set()


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in FIELDS if f"`{name.upper()}`" not in readme]
    assert not missing, f"README.md configuration table lacks {missing}"


def test_device_and_dtype_resolve_in_one_place() -> None:
    """The engine loads with ``torch_dtype()`` and ``resolved_device()``; nothing else maps names."""
    import torch

    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert AtlasSettings(dtype=name).torch_dtype() is dtype
    assert AtlasSettings(dtype="float16").torch_dtype() is torch.float16
    assert AtlasSettings(device="cpu").resolved_device() == "cpu"
