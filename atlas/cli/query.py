"""``atlas query ...`` (named questions across every stored prompt) and ``atlas cypher`` (raw
read-only Cypher over the graph)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from atlas.cli import get_settings
from atlas.cli._common import (
    FORMAT,
    atlas_driver,
    database,
    emit_json,
    output,
    print_table,
    timeout,
)

T = TypeVar("T")


@click.group()
def query() -> None:
    """Named questions across every stored prompt."""


def _ask(question: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``question(driver, *args, **kwargs)`` (an :mod:`atlas.store.read` function) on the
    configured atlas, with its database and query timeout."""
    with atlas_driver() as driver:
        return question(driver, *args, database=database(), timeout_s=timeout(), **kwargs)


@query.command()
@click.option(
    "--from",
    "source",
    required=True,
    help="supernode:NAME | feature:L/I | token:TEXT | logit:TEXT | image | image:ROW,COL | "
    "image:R0-R1,C0-C1",
)
@click.option(
    "--to", "target", required=True, help="supernode:NAME | feature:L/I | token:TEXT | logit:TEXT"
)
@click.option("--max-hops", type=int, default=4, show_default=True)
@click.option("--min-weight", type=float, default=0.0, show_default=True)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--image-tag", default=None, help="Only prompts whose image has this tag.")
@FORMAT
def paths(
    source: str,
    target: str,
    max_hops: int,
    min_weight: float,
    limit: int,
    image_tag: str | None,
    fmt: str,
) -> None:
    """Directed paths within one prompt, across every prompt, from one endpoint to another."""
    from atlas.store import read

    result = _ask(
        read.paths,
        source,
        target,
        max_hops=max_hops,
        min_weight=min_weight,
        limit=limit,
        cap=get_settings().cypher_row_cap,
        image_tag=image_tag,
    )
    if fmt == "json":
        emit_json(result)
        return
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for p in result["paths"]:
        by_prompt.setdefault(p["prompt"], []).append(p)
    rows = []
    for prompt, ps in by_prompt.items():
        for i, p in enumerate(ps):
            rows.append(
                {
                    "prompt": prompt[:12] if i == 0 else "",
                    "path": " → ".join(p["nodes"]),
                    "weights": p["weights"],
                    "score": p["score"],
                }
            )
    print_table(rows, ["prompt", "path", "weights", "score"], f"paths {source} → {target}")
    agg = [
        {
            "route": " → ".join(a["route"]),
            **{k: a[k] for k in ("n_prompts", "n_paths", "sum_score")},
        }
        for a in result["aggregate"][:limit]
    ]
    print_table(agg, ["route", "n_prompts", "n_paths", "sum_score"], "summed across prompts")
    if result["truncated"]:
        click.echo("(more paths than the row cap: results are partial)", err=True)


@query.command()
@click.argument("spec")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--image-tag", default=None, help="Only prompts whose image has this tag.")
@FORMAT
def active(spec: str, limit: int, image_tag: str | None, fmt: str) -> None:
    """Prompts where a feature (feature:L/I) or supernode (supernode:NAME) is active."""
    from atlas.store import read

    rows = _ask(read.active_prompts, spec, limit=limit, image_tag=image_tag)
    output(
        rows,
        fmt,
        ["prompt", "text", "max_activation", "best_influence", "n_instances", "positions"],
        f"prompts where {spec} is active",
    )


@query.command()
@click.argument("logit")
@click.option("--limit", type=int, default=20, show_default=True)
@FORMAT
def contributors(logit: str, limit: int, fmt: str) -> None:
    """Top direct contributors to a logit (logit:TEXT) summed across prompts."""
    from atlas.store import read

    rows = _ask(read.top_contributors, logit, limit=limit)
    output(
        rows,
        fmt,
        ["name", "kind", "n_prompts", "sum_w", "sum_abs", "max_w"],
        f"top contributors to {logit}",
    )


@query.command()
@click.argument("spec")
@click.option("--limit", type=int, default=20, show_default=True)
@FORMAT
def neighbours(spec: str, limit: int, fmt: str) -> None:
    """Aggregated neighbours of a feature (feature:L/I) or supernode (supernode:NAME)."""
    from atlas.store import read

    rows = _ask(read.neighbours, spec, limit=limit)
    cols = ["direction", "neighbour", "label", "n_prompts", "sum_w", "mean_w", "max_w", "min_w"]
    output(rows, fmt, cols, f"aggregated neighbours of {spec}")


@query.command("supernode-graph")
@click.argument("prompt_id")
@FORMAT
def supernode_graph(prompt_id: str, fmt: str) -> None:
    """One prompt collapsed to its supernodes (plus token and logit nodes)."""
    from atlas.store import read

    rows = _ask(read.prompt_supernode_graph, prompt_id)
    output(rows, fmt, ["source", "target", "weight", "n_edges"], f"supernode graph of {prompt_id}")


@query.command()
@click.argument("a")
@click.argument("b")
@click.option("--limit", type=int, default=20, show_default=True)
@FORMAT
def compare(a: str, b: str, limit: int, fmt: str) -> None:
    """Two prompts side by side: shared and exclusive features, shared feature edges."""
    from atlas.store import read

    result = _ask(read.compare_prompts, a, b, limit=limit)
    if fmt == "json":
        emit_json(result)
        return
    cols = ["feature", "act_a", "act_b"]
    print_table(result["shared_features"][:limit], cols, "features in both")
    print_table(result["only_a"][:limit], cols, f"only in {result['a'][:12]}")
    print_table(result["only_b"][:limit], cols, f"only in {result['b'][:12]}")
    print_table(
        result["shared_edges"][:limit], ["source", "target", "w_a", "w_b"], "shared feature edges"
    )


@query.command()
@click.option("--limit", type=int, default=20, show_default=True)
@FORMAT
def prompts(limit: int, fmt: str) -> None:
    """The most recently ingested prompts."""
    from atlas.store import read

    rows = _ask(read.list_prompts, limit=limit)
    output(
        rows,
        fmt,
        ["id", "text", "n_nodes", "n_edges", "replacement_score", "completeness_score"],
        "prompts",
    )


@click.command()
@click.argument("text")
@click.option("--param", "params", multiple=True, help="name=value (JSON values are parsed).")
@FORMAT
def cypher(text: str, params: tuple[str, ...], fmt: str) -> None:
    """Run read-only Cypher over the graph.

    Refused with one line: writes, LOAD CSV, server commands (SHOW ..., TERMINATE ...), USE,
    procedures other than db.labels / db.relationshipTypes / db.propertyKeys / db.schema.*, and
    =~ patterns whose cost the server cannot bound. Results stop at CYPHER_ROW_CAP rows and
    CYPHER_RESULT_MB megabytes.
    """
    from atlas.store.cypher import parse_params, run_cypher

    settings = get_settings()
    with atlas_driver() as driver:
        res = run_cypher(
            driver,
            text,
            parse_params(list(params)),
            database=database(),
            timeout_s=settings.query_timeout_s,
            row_cap=settings.cypher_row_cap,
            max_bytes=int(settings.cypher_result_mb * 2**20),
        )
    if fmt == "json":
        emit_json({"keys": res.keys, "rows": res.rows, "truncated": res.truncated})
    else:
        print_table(res.rows, res.keys, None)
        if res.truncated:
            click.echo(f"(truncated at {settings.cypher_row_cap} rows)", err=True)


@query.command("image-regions")
@click.argument("spec")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--image-tag", default=None, help="Only prompts whose image has this tag.")
@FORMAT
def image_regions(spec: str, limit: int, image_tag: str | None, fmt: str) -> None:
    """Image regions (image, grid cell) that feed a feature (feature:L/I or supernode:NAME)
    directly, summed across image prompts, with each cell's strongest rollout patches."""
    from atlas.store import read

    rows = _ask(read.image_regions, spec, limit=limit, image_tag=image_tag)
    if fmt != "json":
        for r in rows:
            r["image"] = (r["image"] or "")[:12]
    output(
        rows,
        fmt,
        ["image", "row", "col", "n_prompts", "n_edges", "sum_w", "max_w", "top_patches"],
        f"image regions feeding {spec}",
    )


@query.command("interventions")
@click.option("--supernode", default=None, help="Only interventions touching this supernode.")
@click.option("--limit", type=int, default=100, show_default=True)
@FORMAT
def interventions(supernode: str | None, limit: int, fmt: str) -> None:
    """Stored interventions (on a supernode across prompts, with their effect sizes: the KL of
    the steered next-token distribution from the clean one)."""
    from atlas.store import interventions as iv

    with atlas_driver() as driver:
        rows = iv.interventions(driver, supernode=supernode, limit=limit, database=database())
    columns = ["id", "prompt_id", "prompt", "supernode", "multiplier", "kl", "created_at"]
    output(rows, fmt, columns, "interventions" + (f" on {supernode}" if supernode else ""))


@query.command("faithfulness")
@click.argument("prompt_ids", nargs=-1)
@FORMAT
def faithfulness(prompt_ids: tuple[str, ...], fmt: str) -> None:
    """The stored faithfulness reports (``atlas validate``) of these prompts, or of all."""
    from atlas.store import interventions as iv

    with atlas_driver() as driver:
        rows = iv.faithfulness_table(driver, prompt_ids, database=database())
    columns = ["prompt_id", "prompt", "n_sources", "n_pairs", "spearman", "log_log_pearson"]
    output(rows, fmt, columns, "faithfulness")


@query.command("vector")
@click.argument("name")
@click.option("--limit", type=int, default=10, show_default=True)
@FORMAT
def vector(name: str, limit: int, fmt: str) -> None:
    """A steering vector's closest atlas features (decoder cosine) and the prompts where its
    projection is largest (those it was built from or applied to)."""
    from atlas.store import interventions as iv

    with atlas_driver() as driver:
        report = iv.vector_report(driver, name, limit=limit, database=database())
    if fmt == "json":
        emit_json(report)
        return
    print_table(report["features"], ["rank", "fid", "label", "cosine"], f"features close to {name}")
    print_table(report["prompts"], ["prompt", "projection"], f"prompts projecting on {name}")


_FILTER_HELP = (
    "Prompt filter: all | text:REGEX | answer:TOKEN | tag:TAG | job:ID | supernode:NAME | "
    "id:PREFIX; terms joined by & (all hold), ! negates."
)


@query.command("global")
@click.option(
    "--from",
    "source",
    required=True,
    help="feature:L/I | supernode:NAME | token:TEXT | logit:TEXT | image[:ROW,COL]",
)
@click.option(
    "--to", "target", required=True, help="feature:L/I | supernode:NAME | token:TEXT | logit:TEXT"
)
@click.option("--prompts", "prompt_filter", default=None, help=_FILTER_HELP)
@click.option("--node-threshold", type=float, default=0.8, show_default=True)
@click.option("--edge-threshold", type=float, default=0.98, show_default=True)
@click.option("--max-nodes", type=int, default=40, show_default=True)
@click.option("--max-edges", type=int, default=200, show_default=True)
@click.option("--limit", type=int, default=30, show_default=True, help="Edges in the table.")
@FORMAT
def global_(
    source: str,
    target: str,
    prompt_filter: str | None,
    node_threshold: float,
    edge_threshold: float,
    max_nodes: int,
    max_edges: int,
    limit: int,
    fmt: str,
) -> None:
    """The global circuit between two ends over a prompt set: per node pair the prompts with an
    edge, the mean weight where both are active, ERA and TWERA; pruned by influence."""
    from atlas.store.global_circuit import global_circuit

    with atlas_driver() as driver:
        result = global_circuit(
            driver,
            get_settings(),
            source,
            target,
            prompt_filter,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            max_nodes=max_nodes,
            max_edges=max_edges,
            database=database(),
            timeout_s=timeout(),
        )
    if fmt == "json":
        emit_json(result)
        return
    rows = [
        {
            "source": e["source_name"],
            "target": e["target_name"],
            **{k: e[k] for k in ("n_prompts", "mean_w", "era", "twera", "score")},
        }
        for e in result["edges"][:limit]
    ]
    title = (
        f"global circuit {source} → {target} over {result['n_prompts']} prompts "
        f"({result['filter']}; {len(result['nodes'])} nodes, {len(result['edges'])} edges kept)"
    )
    print_table(rows, ["source", "target", "n_prompts", "mean_w", "era", "twera", "score"], title)


@query.command("contrast")
@click.option("--a", "set_a", required=True, help="Prompt set A. " + _FILTER_HELP)
@click.option("--b", "set_b", required=True, help="Prompt set B (disjoint from A).")
@click.option("--limit", type=int, default=15, show_default=True, help="Rows per table.")
@click.option(
    "--min-prompts",
    type=int,
    default=2,
    show_default=True,
    help="Items seen in fewer prompts (A and B together) are not tested.",
)
@click.option(
    "--min-weight",
    type=float,
    default=0.0,
    show_default=True,
    help="Edges with a smaller |weight| are not read.",
)
@FORMAT
def contrast_(
    set_a: str, set_b: str, limit: int, min_prompts: int, min_weight: float, fmt: str
) -> None:
    """Features, edges and two-hop paths enriched in prompt set A against B: counts, effect
    sizes (rank-biserial, log2 odds), Mann-Whitney and Fisher p-values, BH q-values."""
    from atlas.circuits.contrast import contrast_reading
    from atlas.store.contrast import contrast

    with atlas_driver() as driver:
        result = contrast(
            driver,
            get_settings(),
            set_a,
            set_b,
            limit=limit,
            min_prompts=min_prompts,
            min_weight=min_weight,
            database=database(),
            timeout_s=timeout(),
        )
    if fmt == "json":
        emit_json(result)
        return
    cols = ["name", "k_a", "k_b", "mean_a", "mean_b", "effect", "log2_odds", "p_value", "q_value"]
    head = f"A = {set_a} ({result['n_a']} prompts), B = {set_b} ({result['n_b']} prompts)"
    for family in ("features", "edges", "paths"):
        print_table(result[family], cols, f"{family}: {head}; {contrast_reading(result, family)}")
