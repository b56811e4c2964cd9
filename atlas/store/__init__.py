"""The persistent atlas in Neo4j.

Modules (the driver is always passed in; nothing keeps a global one):

    connection   open_driver(settings), ensure_local_neo4j(settings); the boundary:
                 read_tx / write_tx / read_rows / write_rows / run_autocommit and
                 translate_neo4j_error (every query of the store runs through them)
    schema       apply_schema(driver, schema_dir)
    queries      ALL Cypher of the project, parameterised constants
    ingest       graph_rows(graph) -> PromptRows; ingest_graph / ingest_path / ingest_many,
                 delete_prompt (one transaction per prompt, idempotent, safe with concurrent
                 ingesters)
    read         paths, active_prompts, top_contributors, neighbours, prompt_supernode_graph,
                 compare_prompts, list_prompts, prompt_texts, count_prompts,
                 export_graph / export_json
    supernodes   define / define_from_features / _label / _token, import_from_json, list, show,
                 delete (label and token patterns run client-side, under a time budget)
    labels       store_logit_lens / store_lens, label_features (feature labels on Feature nodes)
    cypher       run_cypher: raw Cypher over the graph only (text and plan checks, READ tx,
                 timeout, row and byte caps)
    synthetic    synthetic_graph(seed, ...): well-formed random graphs for tests and bench

The graph model is drawn in ``schema/README.md``.
"""
