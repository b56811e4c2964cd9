"""The persistent atlas in Neo4j.

Modules (the driver is always passed in; nothing keeps a global one):

    connection   open_driver(settings), ensure_local_neo4j(settings)      (foundation)
    schema       apply_schema(driver, schema_dir)                           (foundation)
    queries      ALL Cypher of the project, parameterised constants
    ingest       graph_rows(graph) -> PromptRows; ingest_graph / ingest_path / ingest_paths
                 (one transaction per prompt, idempotent, safe with concurrent ingesters)
    read         paths, active_prompts, top_contributors, neighbours, prompt_supernode_graph,
                 compare_prompts, export_graph / export_json, run_read
    supernodes   define / define_from_features / _label / _token, import_from_json, list, show,
                 delete
    cypher       run_cypher: read-only raw Cypher (EXPLAIN check, READ tx, timeout, row cap)
    synthetic    synthetic_graph(seed, ...): well-formed random graphs for tests and bench

The graph model is drawn in ``schema/README.md``.
"""
