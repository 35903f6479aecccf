"""Where the shard tasks of the ``pseudolabel`` stage run: a Dask client to a scheduler or to a
new LocalCluster (its workers given the task's thread count), or this process with
``n_workers = 0``; the tasks submitted, their progress shown, the first failure raised.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import dask
from distributed import Client, LocalCluster, as_completed

from sum.progress import children_ignore_sigint, progress_bar
from sum.pseudo.worker import run_shard

log = logging.getLogger(__name__)


def where_run(pcfg) -> str:
    """Where the shards run, for logs and metrics."""
    if pcfg.scheduler_address:
        return pcfg.scheduler_address
    if int(pcfg.n_workers) == 0:
        return "in-process"
    return f"local:{pcfg.n_workers}x{pcfg.threads_per_worker}"


def _log_shard(res: Dict[str, Any]) -> None:
    log.info("%s shard %d: %d images, %d masks, %.1f s", res["dataset"], res["shard"], res["images"], res["masks"], res["seconds"])


def task_threads(pcfg) -> int:
    """torch intra-op threads of one shard task: ``pseudo.torch_threads``, or ``threads_per_worker``
    when 0. Dask's ``threads_per_worker`` is how many tasks a worker runs *at once*, so one worker
    with 1 task slot and 2 torch threads is not the same as one worker with 2 slots of 1 thread
    (the second runs two shards side by side)."""
    return max(1, int(pcfg.torch_threads or pcfg.threads_per_worker))


def _client(pcfg):
    """A Dask client: to ``scheduler_address``, or to a new LocalCluster (returned for closing)."""
    if pcfg.scheduler_address:
        try:
            return Client(pcfg.scheduler_address, timeout=pcfg.connect_timeout_s), None
        except (OSError, TimeoutError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(f"pseudo.scheduler_address={pcfg.scheduler_address!r}: Dask scheduler unreachable ({first})") from None
    # Dask's nanny starts workers with its pre-spawn-environ: OMP/MKL/OPENBLAS_NUM_THREADS=1, which
    # pins torch's matmuls to one thread whatever torch.set_num_threads says, and
    # MALLOC_TRIM_THRESHOLD_=65536, which switches off glibc's adaptive mmap threshold so that every
    # large tensor is mmapped, page-faulted and unmapped again (40% of the CPU time went to the
    # kernel). Local workers get the task's thread count and glibc's defaults instead . A remote cluster's
    # workers are configured where they are started.
    threads = str(task_threads(pcfg))
    environ = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), children_ignore_sigint():
        cluster = LocalCluster(
            n_workers=int(pcfg.n_workers),
            threads_per_worker=int(pcfg.threads_per_worker),
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # no dashboard; its http server on a free port
            silence_logs=logging.WARNING,
        )
    return Client(cluster), cluster


def run_jobs(pcfg, jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Run the shard jobs on Dask (or in this process with ``n_workers = 0``, with the model the
    driver loaded); raise on the first failure after cancelling the rest."""
    results: List[Dict[str, Any]] = []
    bar = progress_bar(sum(len(j["images"]) for j in jobs), "pseudolabel", unit="img")
    if not jobs:
        bar.close()
        return results
    if not pcfg.scheduler_address and int(pcfg.n_workers) == 0:
        try:
            for job in jobs:
                results.append(run_shard(job))
                bar.update(results[-1]["images"])
                _log_shard(results[-1])
        finally:
            bar.close()
        return results

    client, cluster = _client(pcfg)
    try:
        log.info("pseudolabel: %d shards on Dask %s (%s)", len(jobs), client.scheduler.address, where_run(pcfg))
        futures = [
            client.submit(run_shard, job, key=f"pseudolabel-{job['dataset']}-{job['shard']:05d}-{job['config_hash'][:12]}")
            for job in jobs
        ]
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as e:
                client.cancel(futures)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RuntimeError(f"pseudolabel: shard task {fut.key} failed: {type(e).__name__}: {first}") from e
            results.append(res)
            bar.update(res["images"])
            _log_shard(res)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return results
