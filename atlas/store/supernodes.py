"""Supernodes: named groups of global features.

A supernode is defined by an explicit feature list, by a regular expression over feature labels
or over their logit-lens top tokens, or imported from an interchange JSON graph's
``qParams.supernodes``. Names are user text: validated for shape, then always passed to Cypher
as parameters (a name like ``x"}) DETACH DELETE n //`` is stored as the data it is).

Each supernode keeps aggregated edges to the other supernodes (``SAGG``): rebuilt over every
stored prompt when the supernode is (re)defined, and updated by each later ingestion.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Any

import neo4j
import neo4j.exceptions

from atlas.errors import InputError
from atlas.graph import NodeKind
from atlas.store import queries as Q
from atlas.store.ingest import feature_ref, translate_neo4j_error
from atlas.store.read import run_read

log = logging.getLogger(__name__)

MAX_NAME_LEN = 200


def validate_name(name: str) -> str:
    """A supernode name: 1..200 printable characters (no control characters), trimmed."""
    if not isinstance(name, str):
        raise InputError("supernode name must be text")
    name = name.strip()
    if not name:
        raise InputError("supernode name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InputError(f"supernode name longer than {MAX_NAME_LEN} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        raise InputError("supernode name contains control or unassigned characters")
    return name


def validate_pattern(pattern: str) -> str:
    """A regular expression (matched in full by Neo4j's ``=~``); checked before it is sent."""
    if not pattern or len(pattern) > 500:
        raise InputError("pattern must be 1..500 characters")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"bad regular expression {pattern!r}: {exc}") from exc
    return pattern


def _write(driver: neo4j.Driver, database: str | None, what: str, work: Any) -> Any:
    try:
        with driver.session(database=database) as session:
            return session.execute_write(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError) as exc:
        raise translate_neo4j_error(exc, what) from exc


def define(
    driver: neo4j.Driver,
    name: str,
    fids: list[str],
    *,
    kind: str = "features",
    pattern: str | None = None,
    database: str | None = None,
) -> int:
    """Create or redefine a supernode with the given feature refs; returns the member count.

    Membership and the supernode's aggregated edges are written in one transaction.
    """
    name = validate_name(name)
    fids = sorted(set(fids))

    def work(tx: neo4j.ManagedTransaction) -> int:
        rec = tx.run(Q.UPSERT_SUPERNODE, name=name, kind=kind, pattern=pattern, fids=fids).single()
        n = int(rec["n_members"]) if rec is not None else 0
        tx.run(Q.CLEAR_SUPERNODE_AGG, name=name).consume()
        tx.run(Q.REBUILD_SUPERNODE_AGG_OUT, name=name).consume()
        tx.run(Q.REBUILD_SUPERNODE_AGG_IN, name=name).consume()
        return n

    n = int(_write(driver, database, f"defining supernode {name!r}", work))
    if n < len(fids):
        log.warning(
            "supernode %r: %d of %d features are not in the atlas", name, len(fids) - n, len(fids)
        )
    return n


_FEATURE_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def define_from_features(
    driver: neo4j.Driver, name: str, specs: list[str], *, database: str | None = None
) -> int:
    """Supernode from ``LAYER/INDEX`` specs (matching features of every transcoder set)."""
    pairs = []
    for spec in specs:
        m = _FEATURE_SPEC.match(spec.removeprefix("feature:"))
        if m is None:
            raise InputError(f"bad feature {spec!r}: use LAYER/INDEX")
        pairs.append([int(m.group(1)), int(m.group(2))])
    rows = run_read(
        driver,
        Q.FEATURES_BY_PAIRS,
        {"pairs": pairs, "tset": None},
        database=database,
        what="finding features",
    )
    if not rows:
        raise InputError(f"none of the features {specs} is in the atlas")
    return define(driver, name, [r["fid"] for r in rows], kind="features", database=database)


def define_from_label(
    driver: neo4j.Driver, name: str, pattern: str, *, database: str | None = None
) -> int:
    """Supernode of every feature whose label matches ``pattern`` (a full-match regex)."""
    return _define_from_pattern(
        driver, name, pattern, Q.FEATURES_BY_LABEL_PATTERN, "label", database=database
    )


def define_from_token(
    driver: neo4j.Driver, name: str, pattern: str, *, database: str | None = None
) -> int:
    """Supernode of every feature one of whose logit-lens top tokens matches ``pattern``."""
    return _define_from_pattern(
        driver, name, pattern, Q.FEATURES_BY_TOKEN_PATTERN, "token", database=database
    )


def _define_from_pattern(
    driver: neo4j.Driver,
    name: str,
    pattern: str,
    query: str,
    kind: str,
    *,
    database: str | None,
) -> int:
    pattern = validate_pattern(pattern)
    rows = run_read(
        driver, query, {"pattern": pattern}, database=database, what=f"matching {kind}s"
    )
    return define(
        driver, name, [r["fid"] for r in rows], kind=kind, pattern=pattern, database=database
    )


def import_from_json(
    driver: neo4j.Driver, path: str | Path, *, database: str | None = None
) -> dict[str, int]:
    """Define the supernodes of an interchange JSON graph's ``qParams`` (features only)."""
    from atlas.store.ingest import load_graph_file

    graph = load_graph_file(path)
    groups = graph.metadata.extra.get("supernodes") or []
    if not isinstance(groups, list):
        raise InputError(f"{path}: qParams.supernodes must be a list")
    by_id = {nid: i for i, nid in enumerate(graph.node_ids())}
    tset = graph.metadata.transcoders.content_hash
    result: dict[str, int] = {}
    for group in groups:
        if not isinstance(group, list) or not group or not isinstance(group[0], str):
            raise InputError(f"{path}: each supernode must be [label, node_id, ...]")
        label, members = group[0], group[1:]
        fids = []
        for nid in members:
            i = by_id.get(str(nid))
            if i is None:
                raise InputError(f"{path}: supernode {label!r} names unknown node id {nid!r}")
            if int(graph.kind[i]) != NodeKind.FEATURE:
                log.warning("supernode %r: skipping non-feature node %s", label, nid)
                continue
            fids.append(feature_ref(tset, int(graph.layer[i]), int(graph.feature[i])))
        result[validate_name(label)] = define(
            driver, label, fids, kind="qparams", pattern=str(path), database=database
        )
    return result


def list_supernodes(driver: neo4j.Driver, *, database: str | None = None) -> list[dict[str, Any]]:
    """Every supernode with its member count."""
    return run_read(driver, Q.LIST_SUPERNODES, database=database, what="listing supernodes")


def show(driver: neo4j.Driver, name: str, *, database: str | None = None) -> dict[str, Any]:
    """One supernode: definition and members."""
    name = validate_name(name)
    rows = run_read(driver, Q.SHOW_SUPERNODE, {"name": name}, database=database, what="supernode")
    if not rows:
        raise InputError(f"no supernode named {name!r}")
    return rows[0]


def delete(driver: neo4j.Driver, name: str, *, database: str | None = None) -> bool:
    """Delete a supernode (its features stay). Returns False when it did not exist."""
    name = validate_name(name)

    def work(tx: neo4j.ManagedTransaction) -> int:
        rec = tx.run(Q.DELETE_SUPERNODE, name=name).single()
        return int(rec["deleted"]) if rec is not None else 0

    return bool(_write(driver, database, f"deleting supernode {name!r}", work))
