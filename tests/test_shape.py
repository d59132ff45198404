"""The shape of the code: outside ``drrl_env/envs/`` nothing tests a backend's name or reaches
into a backend's internals.

A backend declares what it can do (``teacher_forced``, ``bitwise_replay``, ``rollout``; see
:class:`drrl_env.envs.backends.base.Backend`) and the environment forwards it
(``env.unwrapped.teacher_forced``, ``.bitwise_replay``, ``.n_windows``, ``.rollout``). Code
outside the envs package asks for those instead of comparing ``config.backend`` with a name or
reading ``backend.cache``, ``backend.lm`` or ``backend.n_windows``. Passing ``backend="live"``
to ``gym.make`` is configuration, not a test, and stays allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"tests", "results", "notebooks", "build", "dist", "node_modules"}
"""Top-level folders not scanned (tests may look inside; results hold no code)."""
ENVS = ROOT / "drrl_env" / "envs"
"""The package that owns the backends: the only code that may test their names."""
FORBIDDEN = {
    "a string test of config.backend": re.compile(
        r"\bconfig\.backend\s*(?:==|!=|\bin\b|\bnot\s+in\b)"
        r"|[\"'](?:cached|live)[\"']\s*(?:==|!=)\s*[\w.]*config\.backend\b"
    ),
    "a backend name compared with a literal": re.compile(
        r"\bbackend[\"'\]]*\s*(?:==|!=)\s*[\"'](?:cached|live)[\"']"
    ),
    "a reach into the backend (ask the env)": re.compile(r"\bbackend\.(?:cache|lm|n_windows)\b"),
}
"""What code outside ``drrl_env/envs/`` must not do, by why."""


def python_files() -> list[Path]:
    """Every ``.py`` file of the repository outside tests, ``drrl_env/envs/`` and tool folders."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith((".", "__"))
            and not d.endswith(".egg-info")
            and not (here == ROOT and d in SKIPPED_DIRS)
            and here / d != ENVS
        )
        found += [here / f for f in sorted(files) if f.endswith(".py")]
    return found


def offenders(text: str) -> list[tuple[int, str, str]]:
    """(line number, why, line) of every forbidden construct in ``text``."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        for why, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((number, why, line.strip()))
                break
    return hits


@pytest.mark.parametrize(
    "line",
    [
        'if env.unwrapped.config.backend == "cached":',
        "if base.config.backend != 'cached':",
        'if config.backend in ("cached",):',
        'if "live" == env.config.backend:',
        'return (REWARD_RTOL, REWARD_ATOL) if backend == "live" else (EXACT, EXACT)',
        'if record["backend"] == "cached":',
        "shard = cached.unwrapped.backend.cache.shard(window)",
        "cache = backend.cache",
        "model = env.unwrapped.backend.lm.model",
        "ids = ids.to(backend.lm.device)",
        "windows = range(env.unwrapped.backend.n_windows)",
    ],
)
def test_the_guard_catches_what_it_forbids(line):
    assert offenders(line), line


@pytest.mark.parametrize(
    "line",
    [
        'live = gym.make(args.env_id, backend="live")',
        'backend = "live" if args.live else "cached"',
        '"backend": base.config.backend,',
        'if record["backend"] != base.config.backend:',
        "if not env.unwrapped.teacher_forced:",
        "windows = range(env.unwrapped.n_windows)",
        "values = base.rollout(name, window)",
        "lm = shared_model(config.model, config.device, config.cache_dir)",
    ],
)
def test_the_guard_lets_configuration_and_capabilities_pass(line):
    assert offenders(line) == [], line


def test_the_scan_covers_the_packages_and_skips_envs_and_tests():
    files = {path.relative_to(ROOT).as_posix() for path in python_files()}
    for expected in ("agents/evaluation.py", "drrl_env/replay.py", "benchmarks/env_steps.py"):
        assert expected in files
    assert not any(f.startswith(("drrl_env/envs/", "tests/", ".venv/")) for f in files)


def test_no_backend_name_tests_or_reach_ins_outside_envs():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {why}: {line}"
        for path in python_files()
        for number, why, line in offenders(path.read_text(encoding="utf-8"))
    ]
    assert not found, (
        "outside drrl_env/envs/, ask the env what its backend can do "
        "(env.unwrapped.teacher_forced, .bitwise_replay, .n_windows, .rollout(name)) instead of:\n"
        + "\n".join(found)
    )


def test_measurements_do_not_import_the_controller() -> None:
    """lm.measure and lm.controller form no import circle: both read lm.dispatch."""
    import subprocess
    import sys

    code = (
        "import sys, drrl_env.lm.measure as m; "
        "assert 'drrl_env.lm.controller' not in sys.modules, 'measure imports the controller'; "
        "import drrl_env.lm.controller as c, drrl_env.lm.dispatch as d; "
        "assert c.ACTIVE is d.ACTIVE is m.ACTIVE and c.LayerRecord is d.LayerRecord"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_methods_declare_their_families() -> None:
    """Scripts select methods by declared attributes, not by lists of names."""
    from drrl_env.methods import method_class, method_names

    low_rank = {name for name in method_names() if method_class(name).low_rank_scores}
    assert low_rank == {"gram", "svd", "calibrated", "calibrated-kv"}
    selecting = {name for name in method_names() if not method_class(name).dense_fast_path}
    assert selecting == {"topk", "topk-block", "topp"}
