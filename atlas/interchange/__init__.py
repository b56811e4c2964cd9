"""Interchange JSON: export a :class:`~atlas.graph.Graph` to, and import one from, the graph format of
Anthropic's attribution-graphs frontend and Neuronpedia (``graph-schema.json``).

Format (one JSON object)::

    {"metadata": {"slug", "scan", "prompt", "prompt_tokens", "node_threshold", "schema_version",
                  "generation_settings", "pruning_settings", "info", ...},
     "qParams":  {"pinnedIds": [...], "supernodes": [[label, node_id, ...], ...],
                  "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes":    [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp",
                   "influence", "activation", "token_prob", "is_target_logit", ...}, ...],
     "links":    [{"source": node_id, "target": node_id, "weight": A[target, source]}, ...]}

Node ids written by :func:`graph_to_json` are the project's (see :mod:`atlas.graph`):

==========  =================================  ===============================================
kind        ``node_id``                        ``feature`` field / ``feature_type``
==========  =================================  ===============================================
feature     ``{layer}_{feature}_{pos}``        Cantor pair ``(l+f)(l+f+1)/2 + f`` (schema 1) /
                                               ``"cross layer transcoder"``
error       ``{layer}_-1_{pos}``               ``-1`` / ``"mlp reconstruction error"``
token       ``E_{token_id}_{pos}``             ``pos`` / ``"embedding"``
logit       ``{n_layers+1}_{token_id}_{pos}``  ``token_id`` / ``"logit"``
==========  =================================  ===============================================

The error id differs from circuit-tracer 0.5.0, which writes ``0_{layer}_{pos}`` for errors: that
id collides with the layer-0 feature ``layer`` at the same position (circuit-tracer issue #78).
:func:`graph_from_json` reads both. It classifies nodes by ``feature_type`` (not by id) and
resolves a colliding id in a link as follows: as a *target* it is the feature (error nodes have
no incoming edges); as a *source* it is the candidate consistent with the order circuit-tracer
writes links in (grouped by target, sources in node order) and with the layer rule (a source
sits below its target). A collision that none of these settles is refused with
:class:`~atlas.errors.InputError`.

``weight`` is the raw adjacency entry (not normalised). ``influence`` is the node's cumulative
influence rank from pruning (the frontend's dynamic pruning reads it), ``null`` where unknown.
Everything the frontend does not need but a lossless round trip does (our full
:class:`~atlas.graph.GraphMetadata`, the input ids) travels under ``metadata["atlas"]``; the
schema allows extra keys, and foreign files simply lack it.

Image soft tokens (kind ``image``) are written as the paper's viewer expects them: embedding nodes
``E_{image_token_id}_{pos}`` whose ``prompt_tokens`` entry is ``"<image_soft_token>"``, plus our
fields ``image_sha256``, ``image_row``, ``image_col`` and ``image_k`` (k counted from the first
image token, the index of its ``attention_maps/{k}.png``); the grid and the rollout maps travel
under ``metadata["atlas"]["image"]``. The importer reads them back, and reads the paper's own files
(no image fields) by their ``"<image_soft_token>"`` prompt tokens, with the row-major pooled grid.

Supernodes (``qParams.supernodes``) and labels (``clerp``) come back in
``graph.metadata.extra["supernodes"]`` (``[[label, node_id, ...], ...]`` with the project's ids)
and ``graph.metadata.extra["labels"]`` (``{node_id: label}``).

Files: this module is the only graph-JSON reader and writer. :func:`read_json` reads a file
(one-line :class:`~atlas.errors.InputError` for an unreadable or malformed one);
:func:`write_json` / :func:`write_document` write atomically and refuse NaN; :func:`write_json`
streams the links and refuses a graph above a link count the caller sets.

Modules: :mod:`~atlas.interchange.ids` (ids, feature types, the Cantor pairing, image soft
tokens), :mod:`~atlas.interchange.export` (:func:`graph_to_json`),
:mod:`~atlas.interchange.parse` (:func:`graph_from_json`), :mod:`~atlas.interchange.files`
(:func:`read_json`, :func:`write_json`, :func:`write_document`).
"""

from atlas.interchange.export import graph_to_json
from atlas.interchange.files import (
    DEFAULT_MAX_LINKS,
    GraphTooLargeForJson,
    read_json,
    write_document,
    write_json,
)
from atlas.interchange.ids import (
    FEATURE_TYPE_ERROR,
    FEATURE_TYPE_FEATURE,
    FEATURE_TYPE_LOGIT,
    FEATURE_TYPE_TOKEN,
    GENERATOR_NAME,
    IMAGE_SOFT_TOKEN,
    SCHEMA_VERSION,
    cantor_pair,
    cantor_unpair,
)
from atlas.interchange.parse import graph_from_json, read_document

__all__ = [
    "DEFAULT_MAX_LINKS",
    "FEATURE_TYPE_ERROR",
    "FEATURE_TYPE_FEATURE",
    "FEATURE_TYPE_LOGIT",
    "FEATURE_TYPE_TOKEN",
    "GENERATOR_NAME",
    "IMAGE_SOFT_TOKEN",
    "SCHEMA_VERSION",
    "GraphTooLargeForJson",
    "cantor_pair",
    "cantor_unpair",
    "graph_from_json",
    "graph_to_json",
    "read_document",
    "read_json",
    "write_document",
    "write_json",
]
