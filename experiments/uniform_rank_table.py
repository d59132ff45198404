"""Uniform-rank table: perplexity, fidelity and executed FLOPs with one rank at every layer.

For each method (``svd``, ``gram``, ``calibrated``) and each rank, the same eval windows run
through the frozen model with that rank at every attention layer. Reported per row:

- ``perplexity``: ``exp(sum nll / sum predicted tokens)`` over all windows;
- ``ppl_vs_full``: relative change of that perplexity against the full-rank run;
- ``fidelity_mean``: mean cosine between the executed and the full-rank attention output,
  over windows, segments and layers; ``fidelity_min_layer``: the lowest per-layer mean;
- ``flops_ratio``: executed attention FLOPs (subspace cost included) over full-rank FLOPs;
- ``mean_kl``: mean over predicted tokens of KL(exact || this setting) of the next-token
  distributions, nats (0 for exact attention; non-negative and far less noisy than the
  perplexity change); ``top1_agreement``: fraction of tokens whose most likely next token
  equals exact attention's; each with the 95 % bootstrap interval of the mean over windows
  (``mean_kl_low``/``_high``, ``top1_low``/``_high``; windows have equal lengths, so the mean
  over windows is the mean over tokens; no interval from one window);
- ``kept_fraction``: keys attended exactly over causal keys, mean over layers and segments
  (realised: ``topp`` keeps what the attention mass needs).

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

from drrl_env.data import load_windows
from drrl_env.lm.models import LoadedModel, load_model
from drrl_env.lm.runner import WindowResult, run_window
from drrl_env.methods import make_method, method_class, method_names
from drrl_env.methods.base import CallShape, Setting
from harness.runs import (
    ArgumentError,
    RowLog,
    RunFolder,
    check_device,
    check_unique,
    field_defaults,
    run_main,
)
from harness.statistics import Interval, mean_interval

COLUMNS = (
    "method",
    "rank",
    "keep",
    "perplexity",
    "ppl_vs_full",
    "fidelity_mean",
    "fidelity_min_layer",
    "flops_ratio",
    "flops_vs_causal",
    "mean_kl",
    "mean_kl_low",
    "mean_kl_high",
    "top1_agreement",
    "top1_low",
    "top1_high",
    "kept_fraction",
    "n_windows",
    "n_predicted",
    "wall_s",
)
KEY = ("method", "rank", "keep")
"""Columns of ``table.csv`` that identify one configuration."""
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
    methods: tuple[str, ...] = ("svd", "gram", "calibrated", "calibrated-kv", "topk")
    """Methods to run (names of ``drrl_env.methods``)."""
    ranks: tuple[int, ...] = (16, 24, 32, 48, 64)
    """Ranks of the dense methods, each applied at every layer."""
    sparse_ranks: tuple[int, ...] = (16, 32, 64)
    """Selection ranks of the sparse methods (``topk``, ``topk-block``)."""
    keeps: tuple[float, ...] = (0.5, 0.25, 0.125)
    """Keep fractions of the sparse methods (each with every sparse rank)."""
    mass_ranks: tuple[int, ...] = (16, 64)
    """Selection ranks of the mass-target methods (``topp``); the head dim selects on exact
    scores (the upper bound of the selection)."""
    masses: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
    """Mass targets ``p`` of the mass-target methods (each with every mass rank)."""
    calibration_windows: int = 4
    """Number of ``split="train"`` windows the calibrated bases are estimated on."""
    out_dir: Path = Path("results/uniform_rank")
    """Where table.csv, table.md and config.json are written."""
    overwrite: bool = False
    """Delete an existing table in out_dir and start again."""
    resume: bool = False
    """Keep the finished rows of an existing table in out_dir and run the rest."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device (cuda when present, else cpu)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ArgumentError(f"methods: {unknown} not among {', '.join(method_names())}")
        for keep in self.keeps:
            if not 0 < keep <= 1:
                raise ArgumentError(f"keeps: {keep!r} is outside (0, 1]")
        for mass in self.masses:
            if not 0 <= mass <= 1:
                raise ArgumentError(f"masses: {mass!r} is outside [0, 1]")
        check_unique("masses", self.masses)
        check_unique("mass_ranks", self.mass_ranks)
        check_unique("methods", self.methods)
        check_unique("ranks", self.ranks)
        check_unique("keeps", self.keeps)
        for rank in (*self.ranks, *self.sparse_ranks, *self.mass_ranks):
            if rank < 1:
                raise ArgumentError(f"ranks: {rank} is not a rank (>= 1)")
        for name in ("seq_len", "segment_length", "n_windows", "calibration_windows"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.overwrite and self.resume:
            raise ArgumentError("overwrite and resume exclude each other")
        check_device(self.device)

    def jobs(self) -> list[tuple[str, int, float]]:
        """``(method, rank, keep)`` of every row but the full-rank one, in table order."""
        jobs = []
        for method in self.methods:
            if method_class(method).keep_allows_zero:
                jobs += [(method, r, p) for r in self.mass_ranks for p in self.masses]
            elif method_class(method).uses_keep:
                jobs += [(method, r, k) for r in self.sparse_ranks for k in self.keeps]
            else:
                jobs += [(method, r, 1.0) for r in self.ranks]
        return jobs


@dataclass(frozen=True)
class Row:
    """One line of the table, aggregated over all eval windows."""

    method: str
    rank: int
    keep: float
    perplexity: float
    ppl_vs_full: float
    fidelity_mean: float
    fidelity_min_layer: float
    flops_ratio: float
    flops_vs_causal: float
    mean_kl: float
    mean_kl_low: float
    mean_kl_high: float
    top1_agreement: float
    top1_low: float
    top1_high: float
    kept_fraction: float
    n_windows: int
    n_predicted: int
    wall_s: float


def run_windows(
    lm: LoadedModel,
    windows: np.ndarray,
    segment_length: int,
    method,
    rank: int | None,
    keep: float = 1.0,
    references: list[torch.Tensor] | None = None,
) -> list[WindowResult]:
    """Run every window (rows of ``windows``) with ``rank`` at every layer (None: exact).

    A sparse method's rank comes with its ``keep`` (at the head dim too: exact-score
    selection is not exact attention). ``references`` (exact next-token log-probs per
    window) make each result carry its KL and top-1 agreement; None keeps this run's own
    log-probs instead (the exact run, whose log-probs are the references).
    """
    schedule = rank if rank is None or keep >= 1 else Setting(rank, keep)
    with torch.inference_mode():
        return [
            run_window(
                lm,
                tokens,
                segment_length,
                method,
                schedule,
                reference=None if references is None else references[index],
                keep_logprobs=references is None,
            )
            for index, tokens in enumerate(windows)
        ]


def causal_exact_flops(lm: LoadedModel, result: WindowResult) -> float:
    """FLOPs of exact attention that skips masked scores (a flash-style kernel), one window."""
    total, start = 0.0, 0
    for _ in range(result.ranks.shape[0]):
        queries = min(result.segment_length, result.n_predicted + 1 - start)
        shape = CallShape(queries, start + queries, lm.head_dim, lm.n_heads, lm.n_kv_heads)
        per_head = int(shape.causal_keys().sum()) * (4 * lm.head_dim + 5)
        total += per_head * lm.n_heads * lm.n_layers
        start += queries
    return total


def quality_interval(per_window: list[float], exact: float) -> tuple[float, float]:
    """95 % bootstrap interval of a per-window quality's mean (its value at exact attention
    when nothing was compared: the exact run itself; NaN bounds for one window)."""
    if not per_window:
        return exact, exact
    interval = mean_interval(per_window)
    return interval.low, interval.high


def aggregate(
    lm: LoadedModel,
    method: str,
    rank: int,
    keep: float,
    results: list[WindowResult],
    wall_s: float,
    full_ppl: float | None,
) -> Row:
    """Pool the windows of one configuration into a table row."""
    nll = sum(r.nll_sum for r in results)
    predicted = sum(r.n_predicted for r in results)
    perplexity = math.exp(nll / predicted)
    fidelity = np.stack([r.fidelity for r in results])  # (W, S, L)
    per_layer = fidelity.mean(axis=(0, 1))  # (L,)
    flops = sum(float(r.flops.sum()) for r in results)
    flops_full = sum(float(r.flops_full.sum()) for r in results)
    causal = sum(causal_exact_flops(lm, r) for r in results)
    compared = [r.comparison for r in results if r.comparison is not None]
    count = sum(c.count for c in compared)
    kl = quality_interval([c.mean_kl for c in compared], 0.0)
    top1 = quality_interval([c.top1_agreement for c in compared], 1.0)
    return Row(
        method=method,
        rank=rank,
        keep=keep,
        perplexity=perplexity,
        ppl_vs_full=(perplexity / full_ppl - 1.0) if full_ppl else 0.0,
        fidelity_mean=float(fidelity.mean()),
        fidelity_min_layer=float(per_layer.min()),
        flops_ratio=flops / flops_full,
        flops_vs_causal=flops / causal,
        mean_kl=sum(c.kl_sum for c in compared) / count if count else 0.0,
        mean_kl_low=kl[0],
        mean_kl_high=kl[1],
        top1_agreement=sum(c.agree for c in compared) / count if count else 1.0,
        top1_low=top1[0],
        top1_high=top1[1],
        kept_fraction=float(np.mean([r.kept.mean() for r in results])),
        n_windows=len(results),
        n_predicted=predicted,
        wall_s=wall_s,
    )


def calibrated_bases(args: Args, lm: LoadedModel) -> tuple[dict[str, torch.Tensor], dict]:
    """Calibrated bases of each scope the methods need, from ``train`` windows."""
    from drrl_env.lm.calibration import calibrate_basis

    scopes = {method_class(m).scope for m in args.methods if method_class(m).needs_basis}
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
        "scopes": sorted(scopes),
    }
    started = time.perf_counter()
    with torch.inference_mode():
        bases = {
            scope: calibrate_basis(lm, train.tokens, args.segment_length, scope=scope)
            for scope in sorted(scopes)
        }
    info["wall_s"] = time.perf_counter() - started
    return bases, info


def _format(column: str, value: str) -> str:
    if column in ("perplexity",):
        return f"{float(value):.2f}"
    if column == "ppl_vs_full":
        return f"{100 * float(value):+.1f} %"
    if column in (
        "fidelity_mean",
        "fidelity_min_layer",
        "flops_ratio",
        "flops_vs_causal",
        "top1_agreement",
        "kept_fraction",
    ):
        return f"{float(value):.3f}"
    if column == "mean_kl":
        return f"{float(value):.2e}"
    if column == "keep":
        return f"{float(value):g}"
    if column == "wall_s":
        return f"{float(value):.1f}"
    return value


INTERVALS = {
    "mean_kl": ("mean_kl_low", "mean_kl_high"),
    "top1_agreement": ("top1_low", "top1_high"),
}
"""Columns shown with their 95 % interval over windows, and the CSV columns of its bounds."""
BOUNDS = {bound for pair in INTERVALS.values() for bound in pair}


def _cell(column: str, row: dict) -> str:
    """One Markdown cell: the value, with its interval where the CSV has one (tables written
    before the intervals existed have none)."""
    low, high = (row.get(name, "") for name in INTERVALS.get(column, ("", "")))
    if not low or not high or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return _format(column, row[column])
    interval = Interval(float(row[column]), float(low), float(high), int(row["n_windows"]))
    return interval.format(scientific=column == "mean_kl")


def markdown_from_csv(csv_path: Path, head_dim: int | None = None) -> str:
    """Render the table CSV as a Markdown table (numbers rounded for reading).

    Args:
        csv_path: The ``table.csv`` written by :func:`write_csv`.
        head_dim: When given, a note says that rows at this rank reuse the full-rank run.
    """
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in (list(rows[0].keys()) if rows else COLUMNS) if c not in BOUNDS]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row) for c in columns) + " |")
    if head_dim is not None:
        lines += [
            "",
            f"Rank {head_dim} (= head dim) at keep 1 runs exact attention for every method: "
            "those rows repeat the `full` run. `flops_ratio` is executed over exact attention "
            "FLOPs counted densely (every score, as the eager kernels compute them); "
            "`flops_vs_causal` over exact attention that skips the masked scores (a "
            "flash-style kernel).",
        ]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """Write the rows with full precision (the format :class:`~harness.runs.RowLog` appends)."""
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
    record = {**record, "keep": record.get("keep", 1.0)}
    record.update({bound: record.get(bound, math.nan) for bound in BOUNDS})  # older tables
    return Row(**{name: kinds.get(name, float)(record[name]) for name in COLUMNS})


def main(args: Args) -> Path:
    """Validate, open ``out_dir``, run the configurations it does not hold, write the table."""
    folder = RunFolder(
        args.out_dir,
        overwrite=args.overwrite,
        resume=args.resume,
        ignored=NOT_RESULTS,
        defaults=field_defaults(Args),
    )
    folder.check(asdict(args))  # before loading anything
    started = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    too_large = [rank for rank in (*args.ranks, *args.sparse_ranks) if rank > lm.head_dim]
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
    keys = [{"method": "full", "rank": lm.head_dim, "keep": 1.0}]
    keys += [{"method": m, "rank": r, "keep": k} for m, r, k in args.jobs()]
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

    def finished(method: str, rank: int, keep: float) -> Row | None:
        record = records.get(log.key_of({"method": method, "rank": rank, "keep": keep}))
        return None if record is None else row_from_record(record)

    full = finished("full", lm.head_dim, 1.0)
    t0 = time.perf_counter()
    results = run_windows(lm, tokens, args.segment_length, "full", None)
    references = [r.logprobs for r in results]  # exact next-token log-probs per window
    if full is None:
        full = aggregate(lm, "full", lm.head_dim, 1.0, results, time.perf_counter() - t0, None)
        log.append([asdict(full)])
    jobs = args.jobs()
    todo = [(m, r, k) for m, r, k in jobs if finished(m, r, k) is None]
    bases: dict[str, torch.Tensor] = {}
    if any(method_class(m).needs_basis and not (r == lm.head_dim and k >= 1) for m, r, k in todo):
        bases, basis_info = calibrated_bases(args, lm)
        folder.update_config(calibration=basis_info)
    for method, rank, keep in tqdm(jobs, desc="method x setting"):
        row = finished(method, rank, keep)
        if row is None and rank == lm.head_dim and keep >= 1:  # exact attention, every method
            row = Row(**{**asdict(full), "method": method})
            log.append([asdict(row)])
        elif row is None:
            t0 = time.perf_counter()
            cls = method_class(method)
            kwargs = {"basis": bases[cls.scope]} if cls.needs_basis else {}
            attention = make_method(method, lm.head_dim, lm.n_layers, **kwargs)
            results = run_windows(
                lm, tokens, args.segment_length, attention, rank, keep, references
            )
            row = aggregate(
                lm, method, rank, keep, results, time.perf_counter() - t0, full.perplexity
            )
            log.append([asdict(row)])
            tqdm.write(
                f"{method:>16} r={rank:<3} keep={keep:<5g} ppl={row.perplexity:8.2f} "
                f"fid={row.fidelity_mean:.3f} flops={row.flops_ratio:.3f} "
                f"kl={row.mean_kl:.2e} top1={row.top1_agreement:.3f}"
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
