"""Interventions in the store: one ``(:Intervention)`` node per spec, next to the circuit.

The node's id is the spec's content hash, so storing the same spec again updates one node
(MERGE) rather than adding a second. The spec and the effects are JSON strings (no pickle);
the links say which prompt it ran on, which donor it took, and which features and supernode it
touched (features only when the atlas already has them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from atlas.store import queries as Q
from atlas.store.connection import read_rows, write_rows
from atlas.store.ingest import feature_ref

if TYPE_CHECKING:
    from atlas.pipeline.intervention_payloads import InterventionSpec


def _json(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, separators=(",", ":"))


def intervention_params(
    spec: InterventionSpec,
    answer: dict[str, Any],
    *,
    tset_hash: str,
    touched: Sequence[tuple[int, int]],
    donor_id: str | None,
) -> dict[str, Any]:
    """The parameters of :data:`queries.STORE_INTERVENTION` for one run."""
    predicted = answer.get("predicted")
    sn = spec.supernode
    return {
        "id": answer["id"],
        "now": time.time(),
        "spec": _json(spec.model_dump(mode="json", exclude={"store"})),
        "kl": answer.get("kl"),
        "top": _json(answer.get("top")),
        "watch": _json(answer.get("watch")),
        "predicted": _json(predicted),
        "measured": None if predicted is None else [float(x) for x in predicted["measured"]],
        "prompt_id": answer.get("prompt_id"),
        "prompt": spec.prompt,
        "supernode": None if sn is None else sn.name,
        "multiplier": None if sn is None else sn.multiplier,
        "n_edits": len(spec.edits),
        "donor_id": donor_id,
        "fids": sorted({feature_ref(tset_hash, lay, f) for lay, f in touched}),
    }


def store_intervention(
    driver: Any,
    spec: InterventionSpec,
    answer: dict[str, Any],
    *,
    tset_hash: str,
    touched: Sequence[tuple[int, int]],
    donor_id: str | None,
    database: str | None = None,
) -> None:
    """MERGE the run's node and links (one transaction)."""
    params = intervention_params(
        spec, answer, tset_hash=tset_hash, touched=touched, donor_id=donor_id
    )
    write_rows(
        driver, Q.STORE_INTERVENTION, params, database=database, what="storing an intervention"
    )


def interventions(
    driver: Any, *, supernode: str | None = None, limit: int = 100, database: str | None = None
) -> list[dict[str, Any]]:
    """Stored interventions: those on ``supernode`` across prompts, or the newest ``limit``."""
    if supernode is not None:
        rows = read_rows(
            driver,
            Q.INTERVENTIONS_ON_SUPERNODE,
            {"name": supernode},
            database=database,
            what="interventions on a supernode",
        )
    else:
        rows = read_rows(
            driver, Q.LIST_INTERVENTIONS, {"limit": limit}, database=database, what="interventions"
        )
    return [_decoded(r) for r in rows]


def interventions_by_id(
    driver: Any, ids: Sequence[str], *, database: str | None = None
) -> list[dict[str, Any]]:
    """The stored interventions with these ids (those not stored are left out)."""
    rows = read_rows(
        driver, Q.INTERVENTIONS_BY_ID, {"ids": list(ids)}, database=database, what="interventions"
    )
    return [_decoded(r) for r in rows]


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-string properties back to values (``kl`` is the effect size every run has)."""
    out = dict(row)
    for key in ("top", "watch", "predicted"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


def count(driver: Any, intervention_id: str, *, database: str | None = None) -> int:
    """How many nodes carry this id (the idempotence check: 0 or 1)."""
    rows = read_rows(
        driver,
        Q.COUNT_INTERVENTIONS,
        {"id": intervention_id},
        database=database,
        what="interventions",
    )
    return int(rows[0]["n"]) if rows else 0


def store_faithfulness(driver: Any, report: dict[str, Any], *, database: str | None = None) -> None:
    """MERGE a prompt's faithfulness report (one per prompt; a re-run replaces it)."""
    params = {k: report[k] for k in ("prompt_id", "prompt", "spearman", "log_log_pearson")}
    params |= {k: report[k] for k in ("n_sources", "n_pairs", "logit_influence", "kl")}
    params |= {"sources": _json(report["sources"]), "now": time.time()}
    write_rows(driver, Q.STORE_FAITHFULNESS, params, database=database, what="storing a report")


def faithfulness_table(
    driver: Any, prompt_ids: Sequence[str] | None = None, *, database: str | None = None
) -> list[dict[str, Any]]:
    """The stored faithfulness reports of ``prompt_ids`` (all when None)."""
    ids = None if not prompt_ids else list(prompt_ids)
    return read_rows(
        driver, Q.FAITHFULNESS_TABLE, {"prompt_ids": ids}, database=database, what="faithfulness"
    )


# --------------------------------------------------------------------------- steering vectors
def store_vector(driver: Any, built: dict[str, Any], *, database: str | None = None) -> None:
    """MERGE a vector by name (a rebuild replaces it and its ``CLOSE_TO`` links)."""
    fids = [
        {
            "fid": feature_ref(built["tset"], c["layer"], c["feature"]),
            "cosine": c["cosine"],
            "rank": i,
        }
        for i, c in enumerate(built["close"])
    ]
    params = {k: built[k] for k in ("name", "model", "transcoders", "tset", "layer", "token_rule")}
    params |= {k: built[k] for k in ("vector", "norm", "positive", "negative")}
    params |= {"close": _json(built["close"]), "projections": _json(built["projections"])}
    params |= {"fids": fids, "now": time.time()}
    write_rows(driver, Q.STORE_VECTOR, params, database=database, what="storing a steering vector")


def get_vector(driver: Any, name: str, *, database: str | None = None) -> dict[str, Any]:
    """A stored vector's properties (JSON ones decoded); unknown name: one line."""
    from atlas.errors import InputError

    rows = read_rows(driver, Q.GET_VECTOR, {"name": name}, database=database, what="a vector")
    if not rows:
        raise InputError(f"no steering vector named {name!r}")
    v = dict(rows[0]["v"])
    v["close"] = json.loads(v.get("close") or "[]")
    v["projections"] = json.loads(v.get("projections") or "{}")
    return v


def add_projection(
    driver: Any, name: str, prompt: str, value: float, *, database: str | None = None
) -> None:
    """Keep a prompt's projection on the vector (what ``atlas query vector`` ranks)."""
    v = get_vector(driver, name, database=database)
    projections = v["projections"] | {prompt: value}
    write_rows(
        driver,
        Q.SET_VECTOR_PROJECTIONS,
        {"name": name, "projections": _json(projections)},
        database=database,
        what="a projection",
    )


def list_vectors(driver: Any, *, database: str | None = None) -> list[dict[str, Any]]:
    return read_rows(driver, Q.LIST_VECTORS, database=database, what="steering vectors")


def vector_report(
    driver: Any, name: str, *, limit: int = 10, database: str | None = None
) -> dict[str, Any]:
    """A vector's closest atlas features and the prompts with the largest projection on it."""
    v = get_vector(driver, name, database=database)
    features = read_rows(
        driver, Q.VECTOR_CLOSE_FEATURES, {"name": name}, database=database, what="close features"
    )
    ranked = sorted(v["projections"].items(), key=lambda kv: -kv[1])[:limit]
    return {
        "name": name,
        "layer": v["layer"],
        "features": features,
        "prompts": [{"prompt": p, "projection": x} for p, x in ranked],
    }
