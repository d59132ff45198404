"""Where independent tasks run: in this process, or as Ray tasks on a cluster.

:func:`execute` runs a picklable function on each task and yields the results as tasks
finish; the experiment scripts run their trials through it and the cache builder its
windows. Ray is an optional extra (``pip install 'drrl-gym[ray]'``), imported only when the
``ray`` executor is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'drrl-gym[ray]'"

Task = TypeVar("Task")
Result = TypeVar("Result")


def import_ray():
    """The ``ray`` module; ImportError with the install command when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"the Ray executor needs Ray: {RAY_INSTALL}") from error
    return ray


LOCAL_WORKER_NICENESS = 0
"""Niceness of the workers of a local Ray instance started by :func:`ray_session`."""


@contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start a local instance when it is None.

    An already initialised Ray is used as it is. A session started here is shut down at
    exit. ``env_vars`` are set in every worker (e.g. the cache folder). The workers of a
    local instance run at normal priority (:data:`LOCAL_WORKER_NICENESS`): Ray's default,
    nice 15, leaves them almost no CPU beside any busy process of normal priority.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # "local" always starts a new instance, even where `ray start` ran before
    kwargs: dict[str, Any] = {"address": address or "local", "log_to_driver": True}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": dict(env_vars)}
    if address is None:
        kwargs |= {"num_cpus": num_cpus, "include_dashboard": False}
        kwargs["_system_config"] = {"worker_niceness": LOCAL_WORKER_NICENESS}
    try:
        ray.init(**kwargs)
    except ConnectionError as error:
        raise ConnectionError(
            f"cannot connect to the Ray cluster at {address}: {error}. Check the address that "
            "`ray start --head` printed; a cluster with token authentication (the default of "
            "recent Ray) also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or "
            "~/.ray/auth_token) where this script runs"
        ) from error
    try:
        yield ray
    finally:
        ray.shutdown()


def execute(
    function: Callable[[Task], Result],
    tasks: Sequence[Task],
    executor: str = "local",
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_task: float = 1,
    env_vars: Mapping[str, str] | None = None,
) -> Iterator[tuple[Task, Result]]:
    """Run ``function`` on each task and yield ``(task, result)`` as each one finishes.

    ``local`` runs the tasks in order in this process; ``ray`` submits every task to Ray
    (``function`` and the tasks must pickle; Ray is imported only here) and yields in
    completion order. Stopping the iteration cancels the Ray tasks not yet finished.

    Args:
        function: Runs one task from plain, picklable arguments.
        tasks: The tasks.
        executor: ``local`` or ``ray``.
        address: Ray cluster address (``ray start --head`` prints it); None starts a local
            Ray instance.
        num_cpus: CPUs of that local instance (None: all).
        cpus_per_task: CPUs Ray reserves for each task.
        env_vars: Environment variables of the Ray workers.

    Raises:
        ValueError: Unknown executor.
        ImportError: ``ray`` without Ray installed (the message has the install command).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of {EXECUTORS}")
    if executor == "local":
        for task in tasks:
            yield task, function(task)
        return

    def run_one(task: Task) -> Result:  # ray.remote wants a plain function, not a partial
        return function(task)

    with ray_session(address, num_cpus, env_vars) as ray:
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=0)(run_one)
        pending = {remote.remote(task): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
