"""harness.runs: run-name checks, run folders (new / overwrite / resume), the incremental row
log, device and executor checks, and the local executor."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness import runs
from harness.runs import (
    ArgumentError,
    RowLog,
    RunFolder,
    check_device,
    check_executor,
    check_run_name,
    check_seeds,
    check_unique,
    execute,
    run_main,
    write_atomic,
)

ARGS = {"env_id": "DRRL-Tiny-v0", "seeds": (0, 1), "out_dir": Path("results"), "threads": 2}


# -- names, devices, executors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["smoke", "DRRL-Tiny-v0__compare_agents__0__17", "a.b", "..a"])
def test_run_name_accepts_one_folder_name(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/abs/run", "x/../y"])
def test_run_name_refuses_paths_outside_out_dir(name):
    with pytest.raises(ArgumentError, match=r"run_name=.*single folder name"):
        check_run_name(name)


def test_check_device():
    check_device("cpu")
    with pytest.raises(ArgumentError, match="device='gpu0' is not a torch device"):
        check_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_check_device_cuda_without_cuda_says_how_to_install():
    with pytest.raises(ArgumentError) as raised:
        check_device("cuda")
    message = str(raised.value)
    assert "device='cuda' but CUDA is not available" in message
    assert "device='cpu'" in message and "install a CUDA build of torch" in message
    assert "download.pytorch.org/whl/cu" in message


def test_check_unique_names_the_repeated_value():
    check_unique("seeds", (0, 1))
    with pytest.raises(ArgumentError, match="seeds: 1 is given twice"):
        check_unique("seeds", (0, 1, 1))


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ((), "seeds must name at least one seed"),
        ((-1,), "seeds: -1 (int) is not a seed; seeds are ints in 0..4294967295"),
        ((0, 2**32), "seeds: 4294967296 (int) is not a seed"),
        ((np.int64(3),), "seeds: np.int64(3) (int64) is not a seed"),
        (("0",), "seeds: '0' (str) is not a seed"),
        ((False,), "seeds: False (bool) is not a seed"),
        ((0, 1, 1), "seeds: 1 is given twice"),
        ("01", "seeds must be a sequence of ints, got '01'"),
    ],
)
def test_check_seeds_names_the_bad_seed(seeds, message):
    assert check_seeds("seeds", (0, 2**32 - 1)) == (0, 2**32 - 1)
    with pytest.raises(ArgumentError) as raised:
        check_seeds("seeds", seeds)
    assert message in str(raised.value)


def test_check_executor(monkeypatch):
    check_executor("local", None, None)
    with pytest.raises(ArgumentError, match="executor='dask' is not one of"):
        check_executor("dask", None, None)
    with pytest.raises(ArgumentError, match="address is a Ray option"):
        check_executor("local", "10.0.0.1:6379", None)
    with pytest.raises(ArgumentError, match="ray_num_cpus is a Ray option"):
        check_executor("local", None, 2)
    with pytest.raises(ArgumentError, match="ray_num_cpus sizes the local Ray instance"):
        check_executor("ray", "10.0.0.1:6379", 2)
    monkeypatch.setattr(runs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ArgumentError, match=r"pip install 'drrl-gym\[ray\]'"):
        check_executor("ray", None, None)


def test_import_ray_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ImportError, match=r"pip install 'drrl-gym\[ray\]'"):
        runs.import_ray()
    with pytest.raises(ImportError, match=r"drrl-gym\[ray\]"):
        list(execute(abs, [1], "ray"))


def test_execute_local_in_order_and_unknown_executor():
    assert list(execute(lambda x: x * x, [3, 1, 2])) == [(3, 9), (1, 1), (2, 4)]
    with pytest.raises(ValueError, match="executor='threads'"):
        list(execute(abs, [1], "threads"))


def test_run_main_turns_argument_errors_into_exit_2(capsys):
    def main(args: int) -> None:
        raise ArgumentError(f"bad {args}")

    with pytest.raises(SystemExit) as raised:
        run_main(main, 7)
    assert raised.value.code == 2
    assert capsys.readouterr().err == "error: bad 7\n"


# -- run folder -------------------------------------------------------------------------------


def test_new_folder_gets_config_with_plain_args(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.check(ARGS)
    assert not folder.path.exists(), "check writes nothing"
    assert folder.prepare(ARGS, torch="x") == tmp_path / "run"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config == {
        "args": {"env_id": "DRRL-Tiny-v0", "seeds": [0, 1], "out_dir": "results", "threads": 2},
        "torch": "x",
    }
    assert not folder.resuming


def test_empty_existing_folder_is_a_new_run(tmp_path):
    (tmp_path / "run").mkdir()
    RunFolder(tmp_path / "run").prepare(ARGS)
    assert (tmp_path / "run" / "config.json").is_file()


def test_existing_run_is_refused_without_flags_and_left_untouched(tmp_path):
    RunFolder(tmp_path / "run").prepare(ARGS)
    (tmp_path / "run" / "rows.csv").write_text("a\n1\n")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ArgumentError) as raised:
        RunFolder(tmp_path / "run").prepare(ARGS)
    message = str(raised.value)
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert (tmp_path / "run" / "rows.csv").read_text() == "a\n1\n"


def test_overwrite_removes_the_previous_content(tmp_path):
    RunFolder(tmp_path / "run").prepare({**ARGS, "threads": 1})
    (tmp_path / "run" / "models").mkdir()
    (tmp_path / "run" / "models" / "old.zip").write_bytes(b"old")
    (tmp_path / "run" / "rows.csv").write_text("a\n1\n")
    RunFolder(tmp_path / "run", overwrite=True).prepare(ARGS)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["threads"] == 2


def test_resume_keeps_results_and_counts_resumptions(tmp_path):
    RunFolder(tmp_path / "run").prepare(ARGS)
    (tmp_path / "run" / "rows.csv").write_text("a\n1\n")
    folder = RunFolder(tmp_path / "run", resume=True, ignored=("threads", "out_dir"))
    assert folder.resuming
    folder.prepare({**ARGS, "threads": 8, "out_dir": "elsewhere"})  # ignored arguments
    assert (tmp_path / "run" / "rows.csv").read_text() == "a\n1\n"
    RunFolder(tmp_path / "run", resume=True).prepare(ARGS)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resumed"] == 2
    assert config["args"]["threads"] == 2, "the recorded arguments stay those of the run"
    assert config["args_resumed"] == [{"out_dir": "elsewhere", "threads": 8}, {}]


def test_wall_time_of_every_part_of_a_resumed_run_is_kept(tmp_path):
    RunFolder(tmp_path / "run").prepare(ARGS)
    RunFolder(tmp_path / "run").update_config(wall_s=10.0)
    folder = RunFolder(tmp_path / "run", resume=True)
    folder.prepare(ARGS)
    config = folder.update_config(wall_s=4.5, episodes=3)
    assert config["wall_s"] == 4.5 and config["wall_s_runs"] == [10.0, 4.5]
    assert config["episodes"] == 3
    # an overwrite starts a new run: the list starts again
    fresh = RunFolder(tmp_path / "run", overwrite=True)
    fresh.prepare(ARGS)
    assert fresh.update_config(wall_s=2.0)["wall_s_runs"] == [2.0]
    # a config written before the list existed: its wall_s is the first part
    (tmp_path / "run" / "config.json").write_text(json.dumps({"args": {}, "wall_s": 7.0}))
    assert RunFolder(tmp_path / "run").update_config(wall_s=1.0)["wall_s_runs"] == [7.0, 1.0]


def test_resume_with_other_arguments_names_each_difference(tmp_path):
    RunFolder(tmp_path / "run").prepare(ARGS)
    folder = RunFolder(tmp_path / "run", resume=True, ignored=("threads",))
    changed = {**ARGS, "seeds": (0,), "threads": 1, "total_timesteps": 512}
    with pytest.raises(ArgumentError) as raised:
        folder.check(changed)
    message = str(raised.value)
    assert "seeds (run: [0, 1], now: [0])" in message
    assert "total_timesteps (run: '<not recorded>', now: 512)" in message
    assert "threads" not in message


def test_resume_of_a_run_recorded_before_an_argument_existed(tmp_path):
    """An argument a script gained after the run matches at its default and only there."""
    RunFolder(tmp_path / "run").prepare(ARGS)
    folder = RunFolder(tmp_path / "run", resume=True, defaults={"policies": ("a", "b")})
    folder.check({**ARGS, "policies": ["a", "b"]})  # the default: what the run did
    with pytest.raises(ArgumentError) as raised:
        folder.check({**ARGS, "policies": ("a",)})
    assert "policies (run: '<not recorded>', now: ['a'])" in str(raised.value)
    with pytest.raises(ArgumentError, match="extra"):  # no default known: it differs
        folder.check({**ARGS, "extra": 1})


@dataclass(frozen=True)
class _Later(runs.RunArgs):
    added: tuple[int, ...] = (1, 2)
    made: list = field(default_factory=lambda: [3])


def test_run_args_resume_older_folders_with_new_fields_at_defaults(tmp_path):
    old = {k: v for k, v in asdict(_Later(out_dir=str(tmp_path))).items()}
    del old["added"], old["made"]
    RunFolder(tmp_path / "run").prepare(old)
    assert runs.field_defaults(_Later)["made"] == [3]
    _Later(out_dir=str(tmp_path), resume=True).run_folder()  # both at their defaults
    with pytest.raises(ArgumentError, match="added"):
        _Later(out_dir=str(tmp_path), resume=True, added=(1,)).run_folder()


def test_resume_needs_a_readable_config(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rows.csv").write_text("a\n")
    with pytest.raises(ArgumentError, match="no readable config.json"):
        RunFolder(tmp_path / "run", resume=True).check(ARGS)
    RunFolder(tmp_path / "new", resume=True).prepare(ARGS)  # nothing to resume: a new run
    assert (tmp_path / "new" / "config.json").is_file()


def test_folder_flags_and_file_path_refused(tmp_path):
    with pytest.raises(ArgumentError, match="overwrite and resume exclude each other"):
        RunFolder(tmp_path, overwrite=True, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="is not a folder"):
        RunFolder(tmp_path / "file", overwrite=True).check(ARGS)


def test_update_config_merges(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.prepare(ARGS)
    config = folder.update_config(wall_s=1.5, model={"head_dim": 64})
    assert config["args"]["env_id"] == "DRRL-Tiny-v0" and config["wall_s"] == 1.5
    assert json.loads(folder.config_path.read_text()) == config


def test_write_atomic_leaves_no_partial_file(tmp_path):
    write_atomic(tmp_path / "a" / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "a" / "b.bin", "text")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]
    assert (tmp_path / "a" / "b.bin").read_text() == "text"


# -- row log ----------------------------------------------------------------------------------


def rows(method: str, n: int, start: float = 0.0) -> list[dict]:
    return [
        {
            "method": method,
            "seed": np.int64(0),
            "window": w,
            "value": start + w / 3,
            "ranks": json.dumps([[8, 16], [24, 32]]),
            "perplexity": math.nan,
        }
        for w in range(n)
    ]


def test_row_log_round_trips_exactly(tmp_path):
    log = RowLog(tmp_path / "log.csv", key=("method", "seed"))
    assert log.columns() is None and log.keys() == set() and log.read().empty
    values = [0.1 + 0.2, 1 / 3, 1e-300, -2.5e17, np.float32(0.7)]
    log.append([{"method": "gram", "seed": 0, "value": v} for v in values])
    frame = log.read()
    assert frame["value"].tolist() == [float(v) for v in values]
    log2 = RowLog(tmp_path / "log2.csv", key=("method", "seed"))
    log2.append(pd.DataFrame(rows("svd", 2)))
    back = log2.read()
    assert back["ranks"].tolist() == [json.dumps([[8, 16], [24, 32]])] * 2
    assert back["perplexity"].isna().all() and back["seed"].tolist() == [0, 0]


def test_row_log_appends_are_on_disk_at_once(tmp_path):
    log = RowLog(tmp_path / "log.csv", key=("method", "seed"))
    log.append(rows("gram", 2))
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "method,seed,window,value,ranks,perplexity" and len(lines) == 3
    log.append(rows("svd", 1))
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 4


def test_row_log_keys_counts_and_retain(tmp_path):
    log = RowLog(tmp_path / "log.csv", key=("method", "seed"))
    log.append(rows("gram", 2))
    log.append(rows("svd", 1))
    assert log.counts() == {("gram", "0"): 2, ("svd", "0"): 1}
    assert log.key_of({"method": "gram", "seed": np.int64(0)}) == ("gram", "0")
    assert log.retain({("gram", "0")}) == 1
    assert log.counts() == {("gram", "0"): 2}
    assert log.retain({("gram", "0")}) == 0


def test_row_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "log.csv"
    RowLog(path, key=("method", "seed")).append(rows("gram", 2))
    path.write_text(path.read_text() + 'svd,0,0,0.5,"[[8')  # a write cut by a crash
    log = RowLog(path, key=("method", "seed"))
    assert log.counts() == {("gram", "0"): 2}
    log.append(rows("svd", 1))
    assert log.counts() == {("gram", "0"): 2, ("svd", "0"): 1}


def test_row_log_refuses_other_columns(tmp_path):
    log = RowLog(tmp_path / "log.csv", key=("method", "seed"))
    log.append(rows("gram", 1))
    with pytest.raises(ValueError, match="has \\['method', 'seed', 'window'"):
        log.append([{"method": "svd", "seed": 0, "other": 1}])
    with pytest.raises(ValueError, match=r"lack the key column\(s\) \['seed'\]"):
        log.append([{"method": "svd"}])
    with pytest.raises(ValueError, match="key must name at least one column"):
        RowLog(tmp_path / "x.csv", key=())


def test_row_log_sorted_by_and_rewrite(tmp_path):
    log = RowLog(tmp_path / "log.csv", key=("method", "seed"))
    log.append(rows("svd", 2, start=10))
    log.append(rows("gram", 2))
    order = [{"method": "gram", "seed": 0}, {"method": "svd", "seed": 0}]
    frame = log.sorted_by(order)
    assert frame["method"].tolist() == ["gram", "gram", "svd", "svd"]
    assert frame["window"].tolist() == [0, 1, 0, 1]
    log.rewrite(frame)
    pd.testing.assert_frame_equal(log.read(), frame)
    with pytest.raises(ValueError, match=r"keys not in the order: \[\('svd', '0'\)\]"):
        log.sorted_by(order[:1])
