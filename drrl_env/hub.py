"""One bounded check of the Hugging Face hub, shared by the data loaders and the model loader.

A TCP connect is not enough: a network that accepts connections and never answers (a
captive proxy, a firewall that drops replies) lets ``datasets`` and ``transformers`` hang for
minutes later. :func:`hub_status` therefore sends a real HTTP ``HEAD`` request to the
endpoint in a daemon thread and waits for it at most ``timeout`` seconds in total, however
slowly the server trickles bytes. The answer is remembered for :data:`REMEMBER_S` seconds.

Honoured environment variables:

=======================  ===================================================================
``HF_HUB_OFFLINE``       ``1``/``true``/``yes``/``on``: the hub is not used at all.
``HF_DATASETS_OFFLINE``  same.
``HF_ENDPOINT``          the hub's address (default ``https://huggingface.co``).
=======================  ===================================================================

:func:`bounded_hub_timeouts` bounds the single requests of a later ``datasets`` or
``huggingface_hub`` call (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``) unless the
user set them.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.error import HTTPError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
ENDPOINT_VAR = "HF_ENDPOINT"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 3.0
REMEMBER_S = 60.0
REQUEST_TIMEOUT_VARS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
REQUEST_TIMEOUT_S = 5.0
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubStatus:
    """Whether the hub may be used, and if not, why (for error messages)."""

    reachable: bool
    endpoint: str
    reason: str = ""
    timeout: float = DEFAULT_TIMEOUT_S


_remembered: dict[str, tuple[float, HubStatus]] = {}
_lock = threading.Lock()


def declared_offline() -> str | None:
    """The first of :data:`OFFLINE_VARS` set to a true value, or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return var
    return None


def hub_endpoint() -> str:
    """The hub's base URL: ``$HF_ENDPOINT`` without a trailing slash, else the public hub."""
    return (os.environ.get(ENDPOINT_VAR, "").strip() or DEFAULT_ENDPOINT).rstrip("/")


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _probe(url: str, timeout: float) -> str:
    """Send ``HEAD url``; return ``""`` if the server answered, else why not.

    The request runs in a daemon thread joined for ``timeout`` seconds: the socket timeout
    of ``urlopen`` bounds each read, the join bounds the total.
    """
    outcome: dict[str, str] = {}

    def request() -> None:
        try:
            head = Request(url, method="HEAD", headers={"User-Agent": "drrl-gym"})
            with urlopen(head, timeout=timeout) as response:
                code = int(response.status)
        except HTTPError as error:
            code = int(error.code)
        except (OSError, ValueError) as error:  # URLError, refused, reset, timed out
            cause = getattr(error, "reason", error)
            if isinstance(error, TimeoutError) or isinstance(cause, TimeoutError):
                outcome["reason"] = f"{url} did not answer within {timeout:g} s"
            else:
                outcome["reason"] = f"{url} could not be reached ({error})"
            return
        outcome["reason"] = f"{url} answered HTTP {code}" if code >= 500 else ""

    worker = threading.Thread(target=request, name="drrl-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if "reason" not in outcome:
        return f"{url} did not answer within {timeout:g} s"
    return outcome["reason"]


def hub_status(timeout: float = DEFAULT_TIMEOUT_S) -> HubStatus:
    """Whether the Hugging Face hub may be used, within ``timeout`` seconds in total.

    Offline variables are read at every call. A probe's answer is remembered per endpoint
    for :data:`REMEMBER_S` seconds (a negative one only for calls that would not wait
    longer than the probe did).

    Args:
        timeout: Bound on the whole check, in seconds.

    Raises:
        ValueError: If ``timeout`` is not a positive number.
    """
    timeout = _check_timeout(timeout)
    endpoint = hub_endpoint()
    offline = declared_offline()
    if offline is not None:
        return HubStatus(False, endpoint, f"{offline} is set", timeout)
    if urlparse(endpoint).scheme not in ("http", "https"):
        reason = f"{ENDPOINT_VAR}={endpoint!r} is not an http(s) URL"
        return HubStatus(False, endpoint, reason, timeout)
    now = time.monotonic()
    with _lock:
        held = _remembered.get(endpoint)
    if held is not None and now - held[0] < REMEMBER_S:
        status = held[1]
        if status.reachable or status.timeout >= timeout:
            return status
    reason = _probe(endpoint, timeout)
    status = HubStatus(not reason, endpoint, reason, timeout)
    with _lock:
        _remembered[endpoint] = (time.monotonic(), status)
    return status


def hub_reachable(timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the hub is not declared offline and answers HTTP within ``timeout`` seconds."""
    return hub_status(timeout).reachable


def unreachable_reason() -> str:
    """Why the hub was last found unusable, for error messages; never probes."""
    offline = declared_offline()
    if offline is not None:
        return f"{offline} is set"
    endpoint = hub_endpoint()
    with _lock:
        held = _remembered.get(endpoint)
    if held is not None and not held[1].reachable:
        return held[1].reason
    return f"{endpoint} is unreachable"


def clear_hub_cache() -> None:
    """Forget remembered answers (the next check probes again)."""
    with _lock:
        _remembered.clear()


@contextmanager
def bounded_hub_timeouts(seconds: float = REQUEST_TIMEOUT_S) -> Iterator[None]:
    """Bound each request of ``huggingface_hub`` (and so ``datasets``) inside the block.

    Sets ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT`` to ``ceil(seconds)`` where
    the user has not set them, in the environment and in ``huggingface_hub.constants`` when
    already imported, and restores both afterwards. Retries may still add up; the bound is
    per request.

    Raises:
        ValueError: If ``seconds`` is not a positive number.
    """
    value = max(1, math.ceil(_check_timeout(seconds)))
    constants = sys.modules.get("huggingface_hub.constants")
    saved: dict[str, tuple[str | None, object]] = {}
    for var in REQUEST_TIMEOUT_VARS:
        if os.environ.get(var, "").strip():
            continue  # the user's choice wins
        saved[var] = (os.environ.get(var), getattr(constants, var, None))
        os.environ[var] = str(value)
        if constants is not None and hasattr(constants, var):
            setattr(constants, var, value)
    try:
        yield
    finally:
        for var, (env_value, constant) in saved.items():
            if env_value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = env_value
            if constants is not None and constant is not None:
                setattr(constants, var, constant)
