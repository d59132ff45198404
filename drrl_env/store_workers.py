"""Build a :class:`~drrl_env.store.ShardStore` in several processes that split its shards.

Each worker process runs the store's resumable build loop; the per-shard locks split the
work between them, so the same build can also be resumed or shared with another process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait
from typing import Any

from tqdm.auto import tqdm

from drrl_env.store import BuildFn, ShardStore, _check_indices

_STOP_GRACE = 10.0  # seconds interrupted workers get to clean up before they are killed


def _run_worker(
    store: ShardStore,
    indices: list[int],
    make_build_fn: Callable[..., BuildFn],
    args: tuple,
    wait_timeout: float | None,
    sender: Any,
) -> None:
    """Entry point of a build worker: report the indices built or the error."""
    try:
        build_fn = make_build_fn(*args)
        built = store.build(indices, build_fn, progress=False, wait_timeout=wait_timeout)
        sender.send(("done", built))
    except BaseException as error:  # noqa: B036 (reported to the parent, which re-raises)
        trace = traceback.format_exc()
        try:
            sender.send(("failed", error, trace))
        except Exception:  # noqa: BLE001 (an unpicklable error is sent as text)
            sender.send(("failed", RuntimeError(repr(error)), trace))
    finally:
        sender.close()


def _stop(processes: list[Any], interrupt: bool) -> None:
    """Join the workers, first sending SIGINT (they clean up) if ``interrupt``; kill hangs."""
    for process in processes:
        if interrupt and process.is_alive() and process.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + _STOP_GRACE
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def build_in_workers(
    store: ShardStore,
    indices: Iterable[int],
    make_build_fn: Callable[..., BuildFn],
    args: tuple = (),
    *,
    workers: int = 2,
    progress: bool = True,
    desc: str | None = None,
    poll_interval: float = 0.5,
    wait_timeout: float | None = None,
) -> list[int]:
    """Run :meth:`ShardStore.build` in ``workers`` spawned processes that split the shards.

    Each worker calls ``make_build_fn(*args)`` once (load a model there, not per shard),
    then builds with the function it returns, starting at its own offset of the missing
    shards; the claims split the work. This process shows progress by polling
    :meth:`ShardStore.missing`. With ``workers=1`` the build runs in this process.

    Args:
        store: The store (pickled to each worker).
        indices: The shards wanted (non-negative ints).
        make_build_fn: A picklable callable, e.g. a module-level function (not a lambda or
            a local function), returning the per-shard ``build_fn``.
        args: Picklable arguments of ``make_build_fn``.
        workers: Number of processes (at least 1).
        progress: Show a progress bar in this process.
        desc: The progress bar's label.
        poll_interval: Seconds between progress polls.
        wait_timeout: See :meth:`ShardStore.build`.

    Returns:
        The indices built, over all workers, sorted.

    Raises:
        StoreNotWritableError: The folder is not writable (before any worker starts).
        Exception: The error of the first failing worker, with its traceback as a note;
            the other workers finish first. ``KeyboardInterrupt`` in this process
            interrupts the workers, which keep their finished shards.
    """
    wanted = _check_indices(indices)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be positive, got {poll_interval}")
    store.check_writable()
    store.remove_stale()
    if workers == 1:
        build_fn = make_build_fn(*args)
        return store.build(
            wanted, build_fn, progress=progress, desc=desc, wait_timeout=wait_timeout
        )
    todo = store.missing(wanted)
    if not todo:
        return []
    context = multiprocessing.get_context("spawn")
    processes, receivers = [], []
    outcomes: dict[int, tuple] = {}
    finished = False
    try:
        for worker in range(workers):
            start = worker * len(todo) // workers
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_run_worker,
                args=(store, todo[start:] + todo[:start], make_build_fn, tuple(args)),
                kwargs={"wait_timeout": wait_timeout, "sender": sender},
                name=f"shard-build-{worker}",
            )
            process.start()
            sender.close()
            processes.append(process)
            receivers.append(receiver)
        with tqdm(
            total=len(wanted),
            initial=len(wanted) - len(todo),
            desc=desc or f"building {store.name} ({workers} workers)",
            unit="shard",
            disable=not progress,
        ) as bar:
            while len(outcomes) < workers:
                pending = [r for k, r in enumerate(receivers) if k not in outcomes]
                for receiver in wait(pending, timeout=poll_interval):
                    worker = receivers.index(receiver)
                    try:
                        outcomes[worker] = receiver.recv()
                    except EOFError:
                        outcomes[worker] = ("died",)
                bar.update(len(wanted) - len(store.missing(wanted)) - bar.n)
        finished = True
    finally:
        _stop(processes, interrupt=not finished)
        for receiver in receivers:
            receiver.close()
    for worker, outcome in sorted(outcomes.items()):
        if outcome[0] == "failed":
            _, error, trace = outcome
            error.add_note(f"in build worker {worker}:\n{trace}")
            raise error
        if outcome[0] == "died":
            code = processes[worker].exitcode
            raise RuntimeError(f"build worker {worker} exited with code {code} before reporting")
    left = store.missing(wanted)
    if left:
        raise RuntimeError(f"build workers ended but shards {left} of {store.folder} are missing")
    return sorted(index for outcome in outcomes.values() for index in outcome[1])
