"""The Ray executor: row-parallel ops and generation requests fan out as Ray tasks.

``specdsl run spec.yaml --executor ray`` (or ``run(plan, executor="ray")``) runs the same plan as the
local executor; only *where* the work happens changes:

* **Row-parallel ops** (``map``, ``filter``, ``format``, ``erase_prompt``, ``pam``, ``segment``,
  ``tokenize``: ops with ``row_parallel = True``) stream through Ray Data (:meth:`RayExecutor.run_streaming`,
  :mod:`.streaming`): the workers read the local executor's batches of the input straight from the
  stored Parquet (so past one machine the run store must be on shared storage), run the op on each and
  write each output batch as a part in the node's staging folder; the driver merges the parts in input
  order, so the table is the one the local executor writes, and the driver never holds it. An op that
  needs a tokenizer loads it in the worker from the model folder the driver resolved
  (:class:`specdsl.execute.row_services.RowServices`, once per worker process); an op's per-batch
  summaries (``batch_summary``) come back with the parts, for its whole-table check on the driver.
  ``map_rows`` (chunks of rows as Ray tasks, concatenated in order) remains for callers that hand over
  rows in memory.
* **Generation** goes through :meth:`RayExecutor.wrap_backend`: the requests that the request journal
  did not already answer are cut into chunks, each chunk is answered by the real backend's
  ``generate`` inside one Ray task, and every result streams back to this process (a Ray streaming
  generator) where ``on_result`` persists it in the journal as it arrives. A killed run loses only the
  answers that were in flight, never a journaled one; a request in the journal is never sent to Ray.
* **Limits hold for the whole generate call, across the cluster**, for a backend that can share them
  (the optional ``make_limiter`` / ``with_limiter`` methods, ``LimitedBackend`` in
  :mod:`specdsl.contract.hookspecs`; litellm has them). When the model's options set a limit (litellm:
  ``concurrency``, ``rpm``, ``tpm``), the driver starts one async actor
  (:class:`~specdsl.executors.ray.limits.SharedLimits`) that hosts the limiter the backend builds; every
  task's backend is handed a :class:`~specdsl.executors.ray.limits.SharedLimiterClient` instead of its own
  limits, and each attempt is admitted by the actor (the requests a task has waiting go in one call; a
  finished request's slot and token correction ride on the next call). The actor lives as long as the
  ``generate`` call; a task that dies has its slots given back. Options that set no limit, or requests
  that fit in one task, start no actor and cost nothing. Other bounds (transformers' ``batch_size``, litellm's
  default concurrency of 16 when left out) hold *per task*: requests in flight are up to
  ``tasks running at once x per-task concurrency``. Tasks running at once are bounded by the cluster's
  CPUs divided by ``task_cpus`` and by ``max_in_flight``.

Connecting: ``RAY_ADDRESS`` set (``auto``, ``host:6379`` or ``ray://host:10001``) connects to that
cluster; unset, a private local Ray instance starts with ``SPECDSL_RAY_NUM_CPUS`` CPUs (default: the
machine's, at most 8). When Ray is already initialised in this process (a notebook, a test, a driver
that called ``ray.init(runtime_env=...)``) that connection is used as is.

Tuning (attributes of the executor, or environment variables read when work starts):

=======================  ================================  =========================================
attribute                environment variable              default
=======================  ================================  =========================================
``rows_per_task``        ``SPECDSL_RAY_ROWS_PER_TASK``     rows / (2 x slots), within [256, 20000]
                                                           (``map_rows`` only; a streamed node's batch
                                                           is ``SPECDSL_BATCH_ROWS``, as locally)
``requests_per_task``    ``SPECDSL_RAY_REQUESTS_PER_TASK`` requests / (4 x slots), within
                                                           [max(16, batch_size), 256]
``task_cpus``            ``SPECDSL_RAY_TASK_CPUS``         1 (CPUs Ray reserves per task)
``task_gpus``            ``SPECDSL_RAY_TASK_GPUS``         0 (set 1 for a local GPU model per task)
``max_in_flight``        ``SPECDSL_RAY_MAX_IN_FLIGHT``     2 x slots (tasks submitted at once; for a
                                                           streamed node, Ray Data's ``concurrency``,
                                                           unset: Ray Data decides)
``num_cpus``             ``SPECDSL_RAY_NUM_CPUS``          min(cpu_count, 8) (local instance only)
=======================  ================================  =========================================

``slots`` is the cluster's CPU count divided by ``task_cpus``.

Failures: an exception raised by an op or a backend inside a task is raised again here as itself (a
:class:`~specdsl.errors.RunError` keeps its node and hint), never as a Ray traceback. A task that dies
(worker killed, node lost, out of memory) makes a :class:`RunError` for a row chunk; for a generation
chunk its unanswered requests come back as failed ``GenResult``s, so the node is incomplete and the
next run retries exactly those. Generation tasks are not retried by Ray (``max_retries=0``): re-issuing
requests is the journal's job, and a paid request is never sent twice behind its back.

Everything a task needs travels by pickle: the op (a module-level object) with its parameters, the
backend object (or, when it cannot be pickled, its name, looked up again in the worker's plugin
registry) and the model options *with secrets resolved*: API keys reach the workers, as they must to
call a provider. Every Ray node needs specdsl and the plugins the spec uses installed.

The package: :mod:`.connect` (reaching Ray, settings), :mod:`.executor` (the driver side),
:mod:`.tasks` (what runs in the workers), :mod:`.streaming` (row-parallel nodes through Ray Data),
:mod:`.limits` (the shared limiter) and :mod:`.transport` (backends and exceptions across the process
boundary).
"""

from __future__ import annotations

from specdsl.executors.ray.connect import (ENV_MAX_IN_FLIGHT, ENV_NUM_CPUS, ENV_REQUESTS_PER_TASK, ENV_ROWS_PER_TASK,
                                          ENV_TASK_CPUS, ENV_TASK_GPUS, INSTALL_HINT, NODE_HINT, ensure_ray)
from specdsl.executors.ray.executor import RayBackend, RayExecutor

__all__ = ["ENV_MAX_IN_FLIGHT", "ENV_NUM_CPUS", "ENV_REQUESTS_PER_TASK", "ENV_ROWS_PER_TASK", "ENV_TASK_CPUS",
           "ENV_TASK_GPUS", "INSTALL_HINT", "NODE_HINT", "RayBackend", "RayExecutor", "ensure_ray"]
