"""All Cypher of Circuit Atlas, in one module, parameterised (never formatted with values).

Each query is a module-level constant; the functions that run them live next to their use in
``atlas.store``. Names are UPPER_SNAKE and say what the query does.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- service / schema
PING = "RETURN 1 AS ok"

AWAIT_INDEXES = "CALL db.awaitIndexes($timeout_s)"

SHOW_INDEXES = "SHOW INDEXES YIELD name, state, type, labelsOrTypes, properties"

SHOW_CONSTRAINTS = "SHOW CONSTRAINTS YIELD name, type, labelsOrTypes, properties"

# Used by the tests' fixture and ``atlas db wipe``: batched so large atlases do not blow memory.
WIPE_DATABASE = "MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS"
