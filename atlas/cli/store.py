"""``atlas import / export / query / cypher / supernode / annotate``: the atlas in Neo4j.

Thin: parse arguments, open the driver (starting the local Neo4j when no ``NEO4J_URI`` is set),
call :mod:`atlas.store` / :mod:`atlas.annotate`, print a rich table or ``--format json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from atlas.cli import get_settings

#: How long the driver itself retries one prompt's transaction (deadlocks, a dropped
#: connection) before ``atlas import``'s own loop, which tells the user, takes over.
IMPORT_DRIVER_RETRY_S = 5.0

_FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


@contextlib.contextmanager
def _driver(*, max_transaction_retry_time_s: float = 30.0) -> Iterator[Any]:
    from atlas.store.connection import ensure_local_neo4j, open_driver

    settings = get_settings()
    ensure_local_neo4j(settings, progress=lambda m: click.echo(m, err=True))
    driver = open_driver(settings, max_transaction_retry_time_s=max_transaction_retry_time_s)
    try:
        yield driver
    finally:
        driver.close()


def _db() -> str:
    return str(get_settings().neo4j_database)


def _timeout() -> float:
    return float(get_settings().query_timeout_s)


def _json_default(o: Any) -> Any:
    if hasattr(o, "iso_format"):
        return o.iso_format()
    if isinstance(o, set):
        return sorted(o)
    return str(o)


def _clean(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(_clean(obj), default=_json_default, ensure_ascii=False, indent=2))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


def _table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    Console().print(table)


def _output(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str], title: str) -> None:
    if fmt == "json":
        _emit_json(rows)
    else:
        _table(rows, columns, title)


# --------------------------------------------------------------------------- import / export
class _DriverRetryFilter:
    """Drops the driver's own multi-line "Transaction failed and will be retried" warnings
    (``atlas import`` reports its retries in one line each); kept with ``-v``."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = logging.getLogger().getEffectiveLevel() >= logging.WARNING
        return not (quiet and str(record.msg).startswith("Transaction failed and will be retried"))


@contextlib.contextmanager
def _quiet_driver_retries() -> Iterator[None]:
    logger = logging.getLogger("neo4j.session")
    flt = _DriverRetryFilter()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _name_file(exc: Exception, path: Path) -> None:
    """Prefix the error's message with the file it is about (unless it names the file already)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and str(path) not in exc.args[0]:
        exc.args = (f"{path}: {exc.args[0]}",)


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=None, help="Rows per UNWIND batch.")
@click.option("--min-weight", type=float, default=None, help="Drop edges with |weight| below this.")
@click.option(
    "--max-edges", type=int, default=None, help="Keep at most this many edges per prompt."
)
def import_cmd(
    paths: tuple[Path, ...], batch_size: int | None, min_weight: float | None, max_edges: int | None
) -> None:
    """Ingest graph artifacts (.safetensors) or interchange JSON (.json) into the atlas.

    Idempotent: prompts already stored are skipped. Directories are searched for both kinds.
    A file whose ingestion meets a transient fault (Neo4j unreachable, e.g. restarting) is
    retried with exponential backoff, up to ~90 s of pauses per file.
    """
    from rich.console import Console
    from rich.progress import Progress

    from atlas.errors import AtlasError
    from atlas.retry import retry_transient
    from atlas.store.ingest import IngestResult, ingest_path
    from atlas.store.schema import apply_schema

    settings = get_settings()
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*") if x.suffix in (".safetensors", ".json")))
        else:
            files.append(p)
    created = skipped = edges = 0
    with (
        _driver(max_transaction_retry_time_s=IMPORT_DRIVER_RETRY_S) as driver,
        _quiet_driver_retries(),
    ):
        apply_schema(driver, database=_db())
        with Progress(console=Console(stderr=True), transient=True) as progress:

            def warn(line: str) -> None:
                progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

            task = progress.add_task("ingesting", total=len(files))
            for f in files:

                def one(f: Path = f) -> IngestResult:
                    return ingest_path(
                        driver,
                        f,
                        database=_db(),
                        batch_size=batch_size or settings.ingest_batch_size,
                        min_abs_weight=settings.ingest_min_abs_weight
                        if min_weight is None
                        else min_weight,
                        max_edges=settings.ingest_max_edges if max_edges is None else max_edges,
                    )

                try:
                    res = retry_transient(one, what=str(f), service="Neo4j", warn=warn)
                except AtlasError as exc:
                    _name_file(exc, f)
                    raise
                created += res.created
                skipped += not res.created
                edges += res.n_edges if res.created else 0
                progress.advance(task)
    click.echo(f"{created} prompt(s) ingested ({edges} edges), {skipped} already stored")


@click.command("export")
@click.argument("prompt_id")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output file.")
def export_cmd(prompt_id: str, out: Path) -> None:
    """Export a stored prompt (id or unique prefix) to interchange JSON or a .safetensors artifact."""
    from atlas.store import read

    with _driver() as driver:
        if out.suffix == ".safetensors":
            graph, _ = read.export_graph(driver, prompt_id, database=_db(), timeout_s=_timeout())
            graph.save(out)
        else:
            doc = read.export_json(driver, prompt_id, database=_db(), timeout_s=_timeout())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            )
    click.echo(str(out))


# --------------------------------------------------------------------------- query
@click.group()
def query() -> None:
    """Named questions across every stored prompt."""


@query.command()
@click.option(
    "--from", "source", required=True, help="supernode:NAME | feature:L/I | token:TEXT | logit:TEXT"
)
@click.option(
    "--to", "target", required=True, help="supernode:NAME | feature:L/I | token:TEXT | logit:TEXT"
)
@click.option("--max-hops", type=int, default=4, show_default=True)
@click.option("--min-weight", type=float, default=0.0, show_default=True)
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def paths(source: str, target: str, max_hops: int, min_weight: float, limit: int, fmt: str) -> None:
    """Directed paths within one prompt, across every prompt, from one endpoint to another."""
    from atlas.store import read

    with _driver() as driver:
        result = read.paths(
            driver,
            source,
            target,
            max_hops=max_hops,
            min_weight=min_weight,
            limit=limit,
            cap=get_settings().cypher_row_cap,
            database=_db(),
            timeout_s=_timeout(),
        )
    if fmt == "json":
        _emit_json(result)
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
    _table(rows, ["prompt", "path", "weights", "score"], f"paths {source} → {target}")
    agg = [
        {
            "route": " → ".join(a["route"]),
            **{k: a[k] for k in ("n_prompts", "n_paths", "sum_score")},
        }
        for a in result["aggregate"][:limit]
    ]
    _table(agg, ["route", "n_prompts", "n_paths", "sum_score"], "summed across prompts")
    if result["truncated"]:
        click.echo("(more paths than the row cap: results are partial)", err=True)


@query.command()
@click.argument("spec")
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def active(spec: str, limit: int, fmt: str) -> None:
    """Prompts where a feature (feature:L/I) or supernode (supernode:NAME) is active."""
    from atlas.store import read

    with _driver() as driver:
        rows = read.active_prompts(driver, spec, limit=limit, database=_db(), timeout_s=_timeout())
    _output(
        rows,
        fmt,
        ["prompt", "text", "max_activation", "best_influence", "n_instances", "positions"],
        f"prompts where {spec} is active",
    )


@query.command()
@click.argument("logit")
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def contributors(logit: str, limit: int, fmt: str) -> None:
    """Top direct contributors to a logit (logit:TEXT) summed across prompts."""
    from atlas.store import read

    with _driver() as driver:
        rows = read.top_contributors(
            driver, logit, limit=limit, database=_db(), timeout_s=_timeout()
        )
    _output(
        rows,
        fmt,
        ["name", "kind", "n_prompts", "sum_w", "sum_abs", "max_w"],
        f"top contributors to {logit}",
    )


@query.command()
@click.argument("spec")
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def neighbours(spec: str, limit: int, fmt: str) -> None:
    """Aggregated neighbours of a feature (feature:L/I) or supernode (supernode:NAME)."""
    from atlas.store import read

    with _driver() as driver:
        rows = read.neighbours(driver, spec, limit=limit, database=_db(), timeout_s=_timeout())
    cols = ["direction", "neighbour", "label", "n_prompts", "sum_w", "mean_w", "max_w", "min_w"]
    _output(rows, fmt, cols, f"aggregated neighbours of {spec}")


@query.command("supernode-graph")
@click.argument("prompt_id")
@_FORMAT
def supernode_graph(prompt_id: str, fmt: str) -> None:
    """One prompt collapsed to its supernodes (plus token and logit nodes)."""
    from atlas.store import read

    with _driver() as driver:
        rows = read.prompt_supernode_graph(driver, prompt_id, database=_db(), timeout_s=_timeout())
    _output(rows, fmt, ["source", "target", "weight", "n_edges"], f"supernode graph of {prompt_id}")


@query.command()
@click.argument("a")
@click.argument("b")
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def compare(a: str, b: str, limit: int, fmt: str) -> None:
    """Two prompts side by side: shared and exclusive features, shared feature edges."""
    from atlas.store import read

    with _driver() as driver:
        result = read.compare_prompts(
            driver, a, b, limit=limit, database=_db(), timeout_s=_timeout()
        )
    if fmt == "json":
        _emit_json(result)
        return
    cols = ["feature", "act_a", "act_b"]
    _table(result["shared_features"][:limit], cols, "features in both")
    _table(result["only_a"][:limit], cols, f"only in {result['a'][:12]}")
    _table(result["only_b"][:limit], cols, f"only in {result['b'][:12]}")
    _table(
        result["shared_edges"][:limit], ["source", "target", "w_a", "w_b"], "shared feature edges"
    )


@query.command()
@click.option("--limit", type=int, default=20, show_default=True)
@_FORMAT
def prompts(limit: int, fmt: str) -> None:
    """The most recently ingested prompts."""
    from atlas.store import queries as Q
    from atlas.store import read

    with _driver() as driver:
        rows = read.run_read(
            driver, Q.LIST_PROMPTS, {"limit": limit}, database=_db(), timeout_s=_timeout()
        )
    _output(
        rows,
        fmt,
        ["id", "text", "n_nodes", "n_edges", "replacement_score", "completeness_score"],
        "prompts",
    )


# --------------------------------------------------------------------------- raw cypher
@click.command()
@click.argument("text")
@click.option("--param", "params", multiple=True, help="name=value (JSON values are parsed).")
@_FORMAT
def cypher(text: str, params: tuple[str, ...], fmt: str) -> None:
    """Run read-only Cypher (writes, LOAD CSV, writing procedures and admin commands refused)."""
    from atlas.store.cypher import parse_params, run_cypher

    settings = get_settings()
    with _driver() as driver:
        res = run_cypher(
            driver,
            text,
            parse_params(list(params)),
            database=_db(),
            timeout_s=settings.query_timeout_s,
            row_cap=settings.cypher_row_cap,
        )
    if fmt == "json":
        _emit_json({"keys": res.keys, "rows": res.rows, "truncated": res.truncated})
    else:
        _table(res.rows, res.keys, None)
        if res.truncated:
            click.echo(f"(truncated at {settings.cypher_row_cap} rows)", err=True)


# --------------------------------------------------------------------------- supernodes
@click.group()
def supernode() -> None:
    """Define, list, show and delete supernodes (named groups of features)."""


@supernode.command("define")
@click.argument("name")
@click.option("--feature", "features", multiple=True, help="LAYER/INDEX (repeatable).")
@click.option(
    "--label", "label_pattern", default=None, help="Regex over feature labels (full match)."
)
@click.option("--token", "token_pattern", default=None, help="Regex over logit-lens top tokens.")
def sn_define(
    name: str, features: tuple[str, ...], label_pattern: str | None, token_pattern: str | None
) -> None:
    """Create or redefine supernode NAME by feature list, label pattern or token pattern."""
    from atlas.errors import InputError
    from atlas.store import supernodes

    given = sum(bool(x) for x in (features, label_pattern, token_pattern))
    if given != 1:
        raise InputError("give exactly one of --feature, --label, --token")
    with _driver() as driver:
        if features:
            n = supernodes.define_from_features(driver, name, list(features), database=_db())
        elif label_pattern:
            n = supernodes.define_from_label(driver, name, label_pattern, database=_db())
        else:
            assert token_pattern is not None
            n = supernodes.define_from_token(driver, name, token_pattern, database=_db())
    click.echo(f"supernode {name!r}: {n} feature(s)")


@supernode.command("import")
@click.argument("path", type=click.Path(path_type=Path))
def sn_import(path: Path) -> None:
    """Define the supernodes of an interchange JSON graph's qParams."""
    from atlas.store import supernodes

    with _driver() as driver:
        result = supernodes.import_from_json(driver, path, database=_db())
    for name, n in result.items():
        click.echo(f"supernode {name!r}: {n} feature(s)")


@supernode.command("list")
@_FORMAT
def sn_list(fmt: str) -> None:
    """Every supernode with its member count."""
    from atlas.store import supernodes

    with _driver() as driver:
        rows = supernodes.list_supernodes(driver, database=_db())
    _output(rows, fmt, ["name", "kind", "pattern", "n_members"], "supernodes")


@supernode.command("show")
@click.argument("name")
@_FORMAT
def sn_show(name: str, fmt: str) -> None:
    """One supernode and its member features."""
    from atlas.store import supernodes

    with _driver() as driver:
        info = supernodes.show(driver, name, database=_db())
    if fmt == "json":
        _emit_json(info)
        return
    click.echo(
        f"{info['name']} ({info['kind']}{', ' + info['pattern'] if info['pattern'] else ''})"
    )
    _table(info["members"], ["fid", "label", "n_prompts"], "members")


@supernode.command("delete")
@click.argument("name")
def sn_delete(name: str) -> None:
    """Delete a supernode (its features stay)."""
    from atlas.errors import InputError
    from atlas.store import supernodes

    with _driver() as driver:
        if not supernodes.delete(driver, name, database=_db()):
            raise InputError(f"no supernode named {name!r}")
    click.echo(f"deleted supernode {name!r}")


# --------------------------------------------------------------------------- annotate
@click.command()
@click.option(
    "--model", "model_dir", default=None, help="Model (directory or hub id) for the logit lens."
)
@click.option("--transcoders", "tc_dir", default=None, help="Transcoder set for the logit lens.")
@click.option("--top-k", type=int, default=10, show_default=True)
def annotate(model_dir: str | None, tc_dir: str | None, top_k: int) -> None:
    """Label features: logit lens (with --model and --transcoders) and top activating tokens."""
    from atlas.annotate.apply import label_features, store_logit_lens
    from atlas.errors import InputError

    if (model_dir is None) != (tc_dir is None):
        raise InputError("--model and --transcoders go together")
    with _driver() as driver:
        if model_dir is not None and tc_dir is not None:
            from atlas.models.loading import load_model
            from atlas.transcoders.loading import load_transcoders

            model = load_model(model_dir)
            tcs = load_transcoders(tc_dir, model)
            w_u = model.hf.get_output_embeddings().weight.detach().T
            tok = model.tokenizer
            n = store_logit_lens(
                driver,
                tcs.info.content_hash,
                [w.detach() for w in tcs.w_dec],
                w_u,
                lambda t: str(tok.decode([t])),
                k=top_k,
                database=_db(),
            )
            click.echo(f"logit lens stored for {n} feature(s)")
        n = label_features(driver, top_k=top_k, database=_db())
    click.echo(f"labelled {n} feature(s)")
