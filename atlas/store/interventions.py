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


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-string properties back to values (``kl`` is the effect size every run has)."""
    out = dict(row)
    for key in ("top", "predicted"):
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
