"""Local services for machines without Docker: a Neo4j launcher and a redis-server.

``neo4j_local`` and ``redis_local`` start detached processes with pid files so one command can
start them and another stop them. Deployments point ``NEO4J_URI`` / ``REDIS_URL`` at real
servers instead (see docker-compose.yml).
"""

from atlas.services._proc import free_port, port_in_use

__all__ = ["free_port", "port_in_use"]
