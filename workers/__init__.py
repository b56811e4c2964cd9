"""Celery side of Circuit Atlas: the app (``workers.app``) and the pipeline tasks
(``workers.tasks``, thin wrappers around ``atlas.pipeline``). Start a worker with ``atlas worker``."""
