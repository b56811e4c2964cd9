"""The service layer every entry point uses (no click, no Celery at import).

Modules:
    payloads   prompt specs, task messages, step results (pydantic, JSON only); ``chunked``
    steps      the task bodies: attribute / ingest / annotate steps, ``run_inline``,
               ``record_failure`` (what the workers wrap and the inline mode calls)
    submit     ``submit``, ``wait_for_job``, ``requeue_stale``, ``read_batch_file``: recording a
               job, sending or running its prompts, following it (progress through a callback)
    liveness   holders and heartbeats of job items, the reaper that re-sends a dead worker's
               items, the tests' pause hook

The model cache and the out-of-memory policy the steps use are :mod:`atlas.engine`.
"""
