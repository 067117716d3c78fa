"""Batch answering on Ray Data (`--ray`): the jobs as a dataset; a CPU stage of parallel tasks that reads and
preprocesses each job's frames (a failure becomes that job's error record); a model stage on an actor pool (one
model per GPU, or `--ray-workers` on CPUs) running batch.py's own batched answering, so the answers are local
caption's; the records streamed back as they are done (in any order), each with its job's number.

The Ray driver is a child process (`drive`), its output nowhere unless --debug: Ray prints what its raylets and
workers report (a worker's death, on stdout too) on its driver's streams, where records may be going. It shuts its
runtime down when told to stop (SIGTERM: Ctrl-C and SIGTERM of videoqa, or its end) or when videoqa dies. A cluster
address that does not answer fails in seconds. Ray is the optional extra `videoqa[ray]`: this module is imported
only for `--ray`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from videoqa.errors import Exit, VideoQAError

EXTRA = "--ray needs Ray Data: pip install 'videoqa[ray]'"


def ray_module():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise VideoQAError(EXTRA) from None
    return ray


def reachable(address: str) -> None:
    """A cluster's HOST:PORT (or ray://HOST:PORT) answers on its port: checked first, since Ray retries a wrong
    one for many minutes. (`auto` with no cluster fails at once by itself.)"""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port or parsed.scheme not in ("tcp", "ray"):
        raise VideoQAError(f"--ray {address}: give auto, HOST:PORT or ray://HOST:10001")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise VideoQAError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})", Exit.DEVICE) from None


@contextmanager
def runtime(address: str | None, *, debug: bool = False) -> Iterator[Any]:
    """Ray, started on this machine (address None: its CPUs and GPUs) or attached to a cluster, quiet unless
    `debug`; shut down at the end."""
    ray = ray_module()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else a token warning and a file under ~/.ray
    level = logging.INFO if debug else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if address is not None:
        reachable(address)
    try:
        ray.init(address=address or "local", logging_level=level, log_to_driver=debug, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise VideoQAError(f"--ray {address or 'local'}: {e}", Exit.DEVICE) from None
    try:
        yield ray
    finally:
        ray.shutdown()


@functools.lru_cache(maxsize=4)
def checkpoint_of(spec: str):
    """The Checkpoint of a spec (JSON), resolved once per worker process."""
    from videoqa.session import Checkpoint

    return Checkpoint(**json.loads(spec)).resolve()


def preparer(spec: str, settings) -> Callable[[dict], dict]:
    """The CPU stage: a job's frames read and preprocessed as local caption's reader does."""
    def prepared(row: dict) -> dict:
        from videoqa.batch import prepare, read_frames_of

        checkpoint = checkpoint_of(spec)
        pixels = functools.partial(checkpoint.family.video.pixels, checkpoint.config)
        sampler = functools.partial(checkpoint.sampler, settings)
        ready = prepare(pixels, pickle.loads(row["job"]), lambda job: read_frames_of(job, sampler))
        return {"n": row["n"], "ready": pickle.dumps(ready)}

    return prepared


def answerer(spec: str, settings) -> type:
    """The model stage's actor class: the model loaded once per actor, each batch answered by batch.py. Its
    constructor takes no arguments (what it needs is in the closure): Ray keeps a restartable actor's arguments
    and says so on stderr."""
    class Answerer:
        def __init__(self):
            import ray
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, round(cpus)))  # Ray sets OMP_NUM_THREADS=1 in its workers
            self.model = checkpoint_of(spec).load()

        def __call__(self, batch: dict) -> dict:
            from videoqa.batch import batch_records

            ready = [pickle.loads(blob) for blob in batch["ready"]]
            found = batch_records(self.model, ready, settings, {})
            return {"n": batch["n"], "record": [pickle.dumps(rec) for rec in found]}

    return Answerer


RETRIES = 3  # pipelines run again after a model actor died (its process killed, its machine gone)


def records(checkpoint, jobs: list, settings, *, address: str | None, debug: bool, batch_size: int, workers: int,
            interrupted: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, dict]]:
    """(job number, record) for every job once, as the cluster finishes them, from a driver in a child process
    (`drive`); `interrupted()` is asked after each, and stops the driver (its runtime shut down)."""
    import multiprocessing

    ray_module()  # a missing extra is said here, before a process starts
    spawn = multiprocessing.get_context("spawn")
    reader, writer = spawn.Pipe(duplex=False)
    child = spawn.Process(target=drive, args=(writer, address, debug, checkpoint.spec(), jobs, settings, batch_size,
                                              workers), daemon=True, name="videoqa-ray-driver")
    child.start()
    writer.close()
    try:
        while not interrupted():
            if not reader.poll(0.25):  # a stop asked for is seen while the next record is being made
                continue
            try:
                item = reader.recv()
            except EOFError:
                raise VideoQAError("the Ray driver process ended without a word (run again with --debug to see why)",
                                   Exit.INTERNAL) from None
            if item is None:
                return
            if isinstance(item, VideoQAError):
                raise item
            yield item
    finally:
        child.terminate()  # the runtime shut down; a driver already done is gone anyway
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def drive(out, address: str | None, debug: bool, spec: dict, jobs: list, settings, batch_size: int,
          workers: int) -> None:
    """The child process: its output to /dev/null unless `debug`; Ctrl-C left to videoqa (which then stops it);
    SIGTERM, or videoqa's death, ends it with its runtime shut down. Sends (number, record) per job, then None;
    or the VideoQAError that stopped it."""
    import signal

    from videoqa.session import Checkpoint

    if not debug:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
    os.setsid()  # the runtime's processes join this group, and end with it: agents outlive ray.shutdown a while
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    orphan_ends()
    try:
        with runtime(address, debug=debug):
            for found in answered(Checkpoint(**spec), jobs, settings, batch_size=batch_size, workers=workers):
                out.send(found)
        out.send(None)
    except VideoQAError as e:
        out.send(e)
    except (BrokenPipeError, EOFError):  # videoqa is gone
        pass
    finally:
        os.killpg(os.getpgrp(), signal.SIGKILL)  # what is left of the runtime, and this process


def orphan_ends() -> None:
    """SIGTERM to this process when its parent dies (Linux), so a killed videoqa leaves no runtime behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def answered(checkpoint, jobs: list, settings, *, batch_size: int, workers: int) -> Iterator[tuple[int, dict]]:
    """(job number, record) for every job once, in a runtime. A model actor that dies takes its pipeline with it:
    the jobs not yet answered go to a new one (new actors), up to RETRIES times. (Ray's own actor restarts keep the
    actors' constructor arguments, and warn about that on stderr.)"""
    import ray

    left = dict(enumerate(jobs))
    for attempt in range(RETRIES + 1):
        try:
            for n, rec in pipeline(checkpoint, left, settings, batch_size=batch_size, workers=workers):
                if left.pop(n, None) is not None:
                    yield n, rec
            return
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, VideoQAError):
                raise cause from None
            died = isinstance(e, ray.exceptions.RayActorError) or isinstance(cause, ray.exceptions.RayActorError)
            if not died or attempt == RETRIES:
                raise VideoQAError(f"the cluster failed: {e}", Exit.INTERNAL) from None


def pipeline(checkpoint, jobs: dict[int, Any], settings, *, batch_size: int,
             workers: int) -> Iterator[tuple[int, dict]]:
    """The jobs (by number) through the two stages, as Ray Data streams the records back."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.verbose_progress = False
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    # on CPUs, half a CPU is left over for reading frames, however many model actors there are
    share = {"num_gpus": 1} if gpus else {"num_cpus": max(0.25, min(1.0, (cpus - 0.5) / workers))}
    rows = ray.data.from_items([{"n": n, "job": pickle.dumps(job)} for n, job in jobs.items()])
    ready = rows.map(preparer(json.dumps(checkpoint.spec(check_memory=False)), settings), num_cpus=0.5)
    answered = ready.map_batches(answerer(json.dumps(checkpoint.spec()), settings), batch_size=batch_size,
                                 compute=ray.data.ActorPoolStrategy(size=gpus or workers), max_restarts=0, **share)
    for row in answered.iter_rows():
        yield int(row["n"]), pickle.loads(row["record"])
