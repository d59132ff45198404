"""Uniform-rank table: perplexity, fidelity and executed FLOPs with one rank at every layer.

For each method (``svd``, ``gram``, ``calibrated``) and each rank, the same eval windows run
through the frozen model with that rank at every attention layer. Reported per row:

- ``perplexity``: ``exp(sum nll / sum predicted tokens)`` over all windows;
- ``ppl_vs_full``: relative change of that perplexity against the full-rank run;
- ``fidelity_mean``: mean cosine between the executed and the full-rank attention output,
  over windows, segments and layers; ``fidelity_min_layer``: the lowest per-layer mean;
- ``flops_ratio``: executed attention FLOPs (subspace cost included) over full-rank FLOPs.

A rank equal to the head dimension runs full attention whatever the method, so those rows
reuse the single full-rank run (``full`` row). The ``calibrated`` bases are estimated on
``train`` windows only, never on the eval windows.

Writes ``table.csv`` (a row appended as each configuration finishes), ``table.md`` (rendered
from the CSV) and ``config.json`` to ``out_dir``. An ``out_dir`` holding an earlier table is
refused unless ``--overwrite`` (start again) or ``--resume`` (keep the finished rows, run the
rest; the arguments must equal those in its ``config.json``).

Example:
    python experiments/uniform_rank_table.py --n-windows 3 --ranks 16 32
    python experiments/uniform_rank_table.py --n-windows 3 --ranks 16 32 --resume
"""

from __future__ import annotations

import csv
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from tqdm import tqdm

from agents.runs import (
    ArgumentError,
    RowLog,
    RunFolder,
    check_device,
    check_unique,
    run_main,
)
from drrl_env.data import load_windows
from drrl_env.lm.models import LoadedModel, load_model
from drrl_env.lm.runner import WindowResult, run_window

COLUMNS = (
    "method",
    "rank",
    "perplexity",
    "ppl_vs_full",
    "fidelity_mean",
    "fidelity_min_layer",
    "flops_ratio",
    "n_windows",
    "n_predicted",
    "wall_s",
)
KEY = ("method", "rank")
"""Columns of ``table.csv`` that identify one configuration."""
METHODS = ("svd", "gram", "calibrated")
NOT_RESULTS = ("out_dir", "overwrite", "resume")
"""Arguments a resumed run may change."""


@dataclass(frozen=True)
class Args:
    """Uniform-rank table over eval windows."""

    model: str = "smollm2-135m"
    """Model name for ``load_model`` (embedded default, tiny test model, HF id or folder)."""
    seq_len: int = 1024
    """Tokens per window."""
    n_windows: int = 3
    """Number of eval windows (the first ones of ``split="eval"``)."""
    segment_length: int = 1024
    """Tokens per segment; equal to ``seq_len`` means one single pass per window."""
    methods: tuple[str, ...] = ("svd", "gram", "calibrated")
    """Low-rank methods to run (``svd``, ``gram``, ``calibrated``)."""
    ranks: tuple[int, ...] = (16, 24, 32, 48, 64)
    """Ranks, each applied at every layer."""
    calibration_windows: int = 4
    """Number of ``split="train"`` windows the calibrated bases are estimated on."""
    basis_path: Path | None = None
    """Optional calibrated-basis file: loaded when it exists, else written after calibrating."""
    out_dir: Path = Path("results/uniform_rank")
    """Where table.csv, table.md and config.json are written."""
    overwrite: bool = False
    """Delete an existing table in out_dir and start again."""
    resume: bool = False
    """Keep the finished rows of an existing table in out_dir and run the rest."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device (cuda when present, else cpu)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ArgumentError(f"methods: {unknown} not among {', '.join(METHODS)}")
        check_unique("methods", self.methods)
        check_unique("ranks", self.ranks)
        for rank in self.ranks:
            if rank < 1:
                raise ArgumentError(f"ranks: {rank} is not a rank (>= 1)")
        for name in ("seq_len", "segment_length", "n_windows", "calibration_windows"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.overwrite and self.resume:
            raise ArgumentError("overwrite and resume exclude each other")
        check_device(self.device)


@dataclass(frozen=True)
class Row:
    """One line of the table, aggregated over all eval windows."""

    method: str
    rank: int
    perplexity: float
    ppl_vs_full: float
    fidelity_mean: float
    fidelity_min_layer: float
    flops_ratio: float
    n_windows: int
    n_predicted: int
    wall_s: float


def run_windows(
    lm: LoadedModel,
    windows: np.ndarray,
    segment_length: int,
    method: str,
    rank: int | None,
    basis: torch.Tensor | None = None,
) -> list[WindowResult]:
    """Run every window (rows of ``windows``) with ``rank`` at every layer (None: full rank)."""
    with torch.inference_mode():
        return [
            run_window(lm, tokens, segment_length, method, rank, basis=basis) for tokens in windows
        ]


def aggregate(
    method: str, rank: int, results: list[WindowResult], wall_s: float, full_ppl: float | None
) -> Row:
    """Pool the windows of one configuration into a table row."""
    nll = sum(r.nll_sum for r in results)
    predicted = sum(r.n_predicted for r in results)
    perplexity = math.exp(nll / predicted)
    fidelity = np.stack([r.fidelity for r in results])  # (W, S, L)
    per_layer = fidelity.mean(axis=(0, 1))  # (L,)
    flops = sum(float(r.flops.sum()) for r in results)
    flops_full = sum(float(r.flops_full.sum()) for r in results)
    return Row(
        method=method,
        rank=rank,
        perplexity=perplexity,
        ppl_vs_full=(perplexity / full_ppl - 1.0) if full_ppl else 0.0,
        fidelity_mean=float(fidelity.mean()),
        fidelity_min_layer=float(per_layer.min()),
        flops_ratio=flops / flops_full,
        n_windows=len(results),
        n_predicted=predicted,
        wall_s=wall_s,
    )


def calibrated_basis(args: Args, lm: LoadedModel) -> tuple[torch.Tensor, dict]:
    """Calibrated bases (L, H, d, d) from ``train`` windows, or from ``args.basis_path``."""
    from drrl_env.lm.calibration import calibrate_basis, load_basis, save_basis

    shape = (lm.n_layers, lm.n_heads, lm.head_dim, lm.head_dim)
    if args.basis_path is not None and args.basis_path.is_file():
        basis = load_basis(args.basis_path, expected_model=lm.name, expected_shape=shape)
        return basis, {"source": "file", "path": str(args.basis_path)}
    train = load_windows(
        lm.tokenizer, args.seq_len, split="train", max_windows=args.calibration_windows
    )
    info = {
        "source": "calibrated",
        "corpus": train.corpus,
        "split": train.split,
        "n_windows": len(train),
        "seq_len": train.seq_len,
        "segment_length": args.segment_length,
    }
    started = time.perf_counter()
    with torch.inference_mode():
        basis = calibrate_basis(lm, train.tokens, args.segment_length)
    info["wall_s"] = time.perf_counter() - started
    if args.basis_path is not None:
        save_basis(args.basis_path, basis, lm.name, metadata=info)
    return basis, info


def _format(column: str, value: str) -> str:
    if column in ("perplexity",):
        return f"{float(value):.2f}"
    if column == "ppl_vs_full":
        return f"{100 * float(value):+.1f} %"
    if column in ("fidelity_mean", "fidelity_min_layer", "flops_ratio"):
        return f"{float(value):.3f}"
    if column == "wall_s":
        return f"{float(value):.1f}"
    return value


def markdown_from_csv(csv_path: Path, head_dim: int | None = None) -> str:
    """Render the table CSV as a Markdown table (numbers rounded for reading).

    Args:
        csv_path: The ``table.csv`` written by :func:`write_csv`.
        head_dim: When given, a note says that rows at this rank reuse the full-rank run.
    """
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0].keys()) if rows else list(COLUMNS)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(c, row[c]) for c in columns) + " |")
    if head_dim is not None:
        lines += [
            "",
            f"Rank {head_dim} (= head dim) runs full attention for every method: "
            "those rows repeat the `full` run.",
        ]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """Write the rows with full precision (the format :class:`~agents.runs.RowLog` appends)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: repr(v) if isinstance(v, float) else v for k, v in asdict(row).items()}
            )


def row_from_record(record: dict) -> Row:
    """A :class:`Row` read back from ``table.csv``."""
    kinds = {"method": str, "rank": int, "n_windows": int, "n_predicted": int}
    return Row(**{name: kinds.get(name, float)(record[name]) for name in COLUMNS})


def main(args: Args) -> Path:
    """Validate, open ``out_dir``, run the configurations it does not hold, write the table."""
    folder = RunFolder(
        args.out_dir, overwrite=args.overwrite, resume=args.resume, ignored=NOT_RESULTS
    )
    folder.check(asdict(args))  # before loading anything
    started = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    too_large = [rank for rank in args.ranks if rank > lm.head_dim]
    if too_large:
        raise ArgumentError(f"ranks: {too_large} exceed the head dim {lm.head_dim} of {lm.name}")
    windows = load_windows(lm.tokenizer, args.seq_len, split="eval", max_windows=args.n_windows)
    if len(windows) < args.n_windows:
        raise ArgumentError(
            f"n_windows: only {len(windows)} eval windows of {args.seq_len} tokens exist"
        )
    folder.prepare(asdict(args), model=model_info(lm))
    eval_info = {"corpus": windows.corpus, "split": windows.split, "n_windows": len(windows)}
    log = RowLog(args.out_dir / "table.csv", KEY)
    keys = [{"method": "full", "rank": lm.head_dim}]
    keys += [{"method": m, "rank": r} for m in args.methods for r in args.ranks]
    log.retain(log.keys() & {log.key_of(key) for key in keys})
    if folder.resuming:
        print(f"resuming {args.out_dir}: {len(log.keys())} of {len(keys)} rows finished")
    try:
        run_rows(args, lm, windows.tokens, log, folder)
    except KeyboardInterrupt:
        print(
            f"interrupted: finished rows are kept in {log.path}; rerun with --resume to run "
            "the rest",
            file=sys.stderr,
        )
        raise
    csv_path = log.rewrite(log.sorted_by(keys))
    markdown = markdown_from_csv(csv_path, lm.head_dim)
    (args.out_dir / "table.md").write_text(markdown)
    folder.update_config(
        model=model_info(lm),
        eval=eval_info,
        torch=torch.__version__,
        device=str(lm.device),
        threads=torch.get_num_threads(),
        platform=platform.platform(),
        wall_s=time.perf_counter() - started,
        notes="rank == head_dim runs full attention for every method; those rows reuse the "
        "full-rank run.",
    )
    print(markdown)
    return csv_path


def run_rows(
    args: Args,
    lm: LoadedModel,
    tokens: np.ndarray,
    log: RowLog,
    folder: RunFolder,
) -> None:
    """Measure each row ``log`` does not hold yet and append it at once."""
    records = {log.key_of(r): r for r in log.read().to_dict("records")}

    def finished(method: str, rank: int) -> Row | None:
        record = records.get(log.key_of({"method": method, "rank": rank}))
        return None if record is None else row_from_record(record)

    full = finished("full", lm.head_dim)
    if full is None:
        t0 = time.perf_counter()
        results = run_windows(lm, tokens, args.segment_length, "full", None)
        full = aggregate("full", lm.head_dim, results, time.perf_counter() - t0, None)
        log.append([asdict(full)])
    jobs = [(m, r) for m in args.methods for r in args.ranks]
    basis = None
    if any(m == "calibrated" and r != lm.head_dim and finished(m, r) is None for m, r in jobs):
        basis, basis_info = calibrated_basis(args, lm)
        folder.update_config(calibration=basis_info)
    for method, rank in tqdm(jobs, desc="method x rank"):
        row = finished(method, rank)
        if row is None and rank == lm.head_dim:  # full attention for every method
            row = Row(**{**asdict(full), "method": method})
            log.append([asdict(row)])
        elif row is None:
            t0 = time.perf_counter()
            method_basis = basis if method == "calibrated" else None
            results = run_windows(lm, tokens, args.segment_length, method, rank, method_basis)
            row = aggregate(method, rank, results, time.perf_counter() - t0, full.perplexity)
            log.append([asdict(row)])
            tqdm.write(
                f"{method:>10} r={rank:<3} ppl={row.perplexity:8.2f} "
                f"fid={row.fidelity_mean:.3f} flops={row.flops_ratio:.3f}"
            )


def model_info(lm: LoadedModel) -> dict:
    """The attention shape of ``lm`` for ``config.json``."""
    return {
        "name": lm.name,
        "n_layers": lm.n_layers,
        "n_heads": lm.n_heads,
        "n_kv_heads": lm.n_kv_heads,
        "head_dim": lm.head_dim,
    }


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))
