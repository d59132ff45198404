"""Executed FLOPs and wall time of one attention layer against sequence length (Figure 3).

For each length ``L`` (queries = keys = ``L``, one causal segment, batch 1, SmolLM2-135M's
heads by default), the same random Q/K/V go through full attention, both as torch SDPA and as
the eager path the model runs, and through the low-rank kernels (``gram``, ``svd``,
``calibrated``, the basis search included) at the ranks asked for: the policy's mean rank,
given with ``--ranks`` or read with ``--from-summary`` from the ``mean_rank`` of the RL rows of
an ``experiments/compare_agents.py`` ``summary.csv`` (rounded, each with its own method).

Executed FLOPs come from :mod:`drrl_env.flops` (dense counts); the honest ceiling of a
low-rank kernel is the FLOPs ratio ``1 - (d - r) / (2d)``: only the scores shrink, ``A V``
does not. Wall time is the median of ``repeats`` timed calls after ``warmup`` untimed ones
(:mod:`drrl_env.lm.kernel_timing`).

Writes ``flops_scaling_<device type>.csv``, ``.md`` (generated from the CSV) and ``.png``
(FLOPs ratio vs L with the ceilings; wall time vs L, log-log) and ``config.json`` under
``<out_dir>/<run_name>`` (default ``results/flops_scaling``). A folder holding an earlier run
is refused unless ``--overwrite`` (start again) or ``--resume``; timings are not kept across
sessions, so a resumed run measures every kernel again (on the run's device: another device
is refused, its files would mix with the run's; measure it under another ``--run-name``).

    python experiments/flops_scaling.py --ranks 24 40
    python experiments/flops_scaling.py --from-summary results/<run>/summary.csv
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import tyro
from tqdm import tqdm

from drrl_env.flops import attention_core_saving_bound, flops_ratio
from drrl_env.lm.kernel_timing import (
    AttentionShape,
    KernelSpec,
    attention_kernels,
    full_flops,
    time_call,
)
from drrl_env.methods import method_class, method_names
from harness.reporting import markdown_from_frame, pyplot, save_figure, table_columns
from harness.runs import (
    ArgumentError,
    RunArgs,
    check_minimum,
    check_unique,
    run_main,
)

DEFAULT_METHODS = ("gram", "svd", "calibrated")
"""The methods measured by default (``--methods`` takes any method whose ``low_rank_scores``
is True: dense attention with rank-r scores, whose ceiling this script draws)."""


def low_rank_methods() -> tuple[str, ...]:
    """The registered methods whose scores alone shrink with the rank (``low_rank_scores``)."""
    return tuple(name for name in method_names() if method_class(name).low_rank_scores)


COLUMNS = (
    "device",
    "L",
    "kernel",
    "rank",
    "source",
    "time_ms",
    "time_vs_sdpa",
    "time_vs_eager",
    "gflops",
    "flops_ratio",
    "ceiling_ratio",
    "warmup",
    "repeats",
)
MARKDOWN_COLUMNS = table_columns(
    "L kernel rank source time_ms time_vs_sdpa time_vs_eager gflops flops_ratio ceiling_ratio",
    source=("rank from", "{}"),
    flops_ratio=("FLOPs / full", "{:.3f}"),
)
"""``(header, CSV column, format)`` of the Markdown table."""


@dataclass(frozen=True)
class Args(RunArgs):
    """Executed FLOPs and wall time of one attention layer vs sequence length."""

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    """Sequence lengths L (queries = keys = L)."""
    ranks: tuple[int, ...] = (16, 32, 48)
    """The policy's mean rank(s), rounded to integers: every method in --methods runs at each."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """Low-rank kernels run at --ranks (``gram``, ``svd``, ``calibrated``)."""
    from_summary: Path | None = None
    """compare_agents ``summary.csv``: the rounded ``mean_rank`` of each RL row, with that row's
    method, is run too (besides --ranks at each method of those rows, for reference)."""
    heads: int = 9
    """Query heads (SmolLM2-135M: 9)."""
    kv_heads: int = 3
    """Key/value heads (SmolLM2-135M: 3)."""
    head_dim: int = 64
    """Head dimension d (SmolLM2-135M: 64)."""
    warmup: int = 1
    """Untimed calls before timing each kernel."""
    repeats: int = 5
    """Timed calls per kernel (the median is reported)."""
    seed: int = 0
    """Seed of the random Q/K/V and of the calibrated basis."""
    threads: int | None = None
    """Torch intra-op threads; None keeps torch's default."""
    run_name: str = "flops_scaling"
    """Run folder inside out_dir: flops_scaling_<device type>.csv, .md, .png and config.json."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_minimum(self, ("heads", "kv_heads", "head_dim", "repeats"))
        check_minimum(self, ("warmup",), low=0)
        if self.threads is not None:
            check_minimum(self, ("threads",))
        if self.heads % self.kv_heads:
            raise ArgumentError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if not self.lengths or min(self.lengths) < 1:
            raise ArgumentError(f"lengths must be >= 1, got {self.lengths}")
        if not all(1 <= rank <= self.head_dim for rank in self.ranks):
            raise ArgumentError(f"ranks must be in 1..head_dim={self.head_dim}, got {self.ranks}")
        if not self.ranks and self.from_summary is None:
            raise ArgumentError("ranks: give at least one rank, or --from-summary")
        for name in ("lengths", "ranks", "methods"):
            check_unique(name, getattr(self, name))
        if self.from_summary is not None and not self.from_summary.is_file():
            raise ArgumentError(f"from_summary: {self.from_summary} is not a file")


def lowrank_kernels(args: Args) -> list[tuple[str, int, str]]:
    """``(method, rank, source)`` of every low-rank kernel to run, duplicates merged.

    Raises:
        ArgumentError: ``--from-summary`` has no RL row, or a method is unknown.
    """
    if args.from_summary is None:
        unknown = set(args.methods) - set(low_rank_methods())
        if unknown:
            raise ArgumentError(
                f"methods must be among {low_rank_methods()}; got {sorted(unknown)}"
            )
        return [(method, rank, "--ranks") for method in args.methods for rank in args.ranks]
    summary = pd.read_csv(args.from_summary)
    rl = summary[(summary["kind"] == "rl") & summary["method"].isin(low_rank_methods())]
    if rl.empty:
        raise ArgumentError(
            f"{args.from_summary} holds no RL row of a method in {low_rank_methods()}"
        )
    sources: dict[tuple[str, int], list[str]] = {}
    for method in dict.fromkeys(rl["method"]):
        for rank in args.ranks:
            sources[(method, rank)] = ["--ranks"]
    for _, row in rl.iterrows():
        rank = min(max(round(float(row["mean_rank"])), 1), args.head_dim)
        sources.setdefault((row["method"], rank), []).append(str(row["policy"]))
    return [(method, rank, " ".join(names)) for (method, rank), names in sources.items()]


def measure(args: Args, kernels: list[tuple[str, int, str]]) -> list[dict]:
    """Time every kernel at every length; one dict per (L, kernel, rank)."""
    device = torch.device(args.device)
    shape = AttentionShape(args.heads, args.kv_heads, args.head_dim)
    sources = {(method, rank): source for method, rank, source in kernels}
    rows: list[dict] = []
    progress = tqdm(total=len(args.lengths) * (2 + len(kernels)), desc="kernels")
    with torch.inference_mode():
        for length in args.lengths:
            specs = [KernelSpec(method, rank) for method, rank, _ in kernels]
            full = full_flops(shape, length)
            timed = []
            for kernel in attention_kernels(shape, length, specs, device, args.seed):
                progress.set_postfix_str(f"L={length} {kernel.name} r={kernel.rank}")
                seconds, _ = time_call(kernel.call, args.warmup, args.repeats, device)
                timed.append((kernel, seconds))
                progress.update()
            sdpa, eager = timed[0][1], timed[1][1]
            for kernel, seconds in timed:
                lowrank = kernel.name in low_rank_methods()
                rows.append(
                    {
                        "device": device.type,
                        "L": length,
                        "kernel": "eager" if kernel.name == "full" else kernel.name,
                        "rank": kernel.rank,
                        "source": sources[(kernel.name, kernel.rank)] if lowrank else "head dim",
                        "time_ms": 1e3 * seconds,
                        "time_vs_sdpa": seconds / sdpa,
                        "time_vs_eager": seconds / eager,
                        "gflops": kernel.flops.total / 1e9,
                        "flops_ratio": flops_ratio(kernel.flops, full),
                        "ceiling_ratio": ceiling(args.head_dim, kernel.rank) if lowrank else None,
                        "warmup": args.warmup,
                        "repeats": args.repeats,
                    }
                )
    progress.close()
    return rows


def ceiling(head_dim: int, rank: int) -> float:
    """The lowest FLOPs ratio a rank-``rank`` kernel can reach: ``1 - (d - r) / (2d)``."""
    return 1.0 - attention_core_saving_bound(head_dim, rank)


def to_markdown(table: pd.DataFrame) -> str:
    """The Markdown table of the CSV rows."""
    return markdown_from_frame(table, MARKDOWN_COLUMNS)


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Two panels: FLOPs ratio vs L with each rank's ceiling; wall time vs L, log-log."""
    plt = pyplot()

    fig, (flops_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (kernel, rank), part in table.groupby(["kernel", "rank"], sort=False):
        label = kernel if kernel in ("sdpa", "eager") else f"{kernel} r={rank}"
        agents = " ".join(n for n in str(part["source"].iloc[0]).split() if n != "--ranks")
        if kernel not in ("sdpa", "eager") and agents:
            label += f" ({agents})"
        style = {"sdpa": "k-o", "eager": "k--o"}.get(kernel, "-o")
        time_ax.plot(part["L"], part["time_ms"], style, label=label)
        if kernel == "sdpa":
            flops_ax.plot(part["L"], part["flops_ratio"], "k-", label="full attention")
        elif kernel != "eager":
            flops_ax.plot(part["L"], part["flops_ratio"], "-o", label=label)
    ranks = sorted(set(table.loc[table["ceiling_ratio"].notna(), "rank"]))
    for rank in ranks:
        value = table.loc[table["rank"] == rank, "ceiling_ratio"].dropna().iloc[0]
        flops_ax.axhline(value, color="grey", linestyle=":", linewidth=1)
        flops_ax.annotate(
            f"ceiling r={rank}: {value:.3f}",
            (table["L"].min(), value),
            fontsize=7,
            xytext=(2, 2),
            textcoords="offset points",
        )
    flops_ax.set_xscale("log", base=2)
    flops_ax.set_xlabel("sequence length L")
    flops_ax.set_ylabel("executed attention FLOPs / full attention")
    flops_ax.set_title("executed FLOPs (basis search included)")
    time_ax.set_xscale("log", base=2)
    time_ax.set_yscale("log")
    time_ax.set_xlabel("sequence length L")
    time_ax.set_ylabel("wall time (ms, median)")
    time_ax.set_title(title)
    for ax in (flops_ax, time_ax):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(args: Args) -> Path:
    """Measure, then write the CSV, the Markdown, the plot and the configuration."""
    # Another device writes other files: resuming on it would mix two runs in one folder.
    folder = args.run_folder()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    kernels = lowrank_kernels(args)
    device_type = torch.device(args.device).type
    folder.prepare(
        asdict(args),
        kernels=[list(kernel) for kernel in kernels],
        torch=torch.__version__,
        device=device_type,
        platform=platform.platform(),
    )
    rows = measure(args, kernels)
    stem = folder.path / f"flops_scaling_{device_type}"
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(stem.with_suffix(".csv"), index=False)
    table = pd.read_csv(stem.with_suffix(".csv"))
    header = (
        f"One attention layer, {args.heads} query heads, {args.kv_heads} kv heads, "
        f"d={args.head_dim}, batch 1, causal, float32, random Q/K/V; device {device_type} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). time: median of {args.repeats} timed calls after "
        f"{args.warmup} untimed; sdpa: torch scaled_dot_product_attention, eager: the model's "
        "eager full attention. FLOPs: executed, from each method's count (dense causal count, "
        "the observation's features and the basis search included); ceiling: 1 - (d - r)/(2d), "
        "the lowest ratio any rank-r kernel can reach (A V keeps its full cost).\n\n"
    )
    (stem.with_suffix(".md")).write_text(header + to_markdown(table))
    plot(table, stem.with_suffix(".png"), f"wall time, {device_type}")
    folder.update_config(threads=torch.get_num_threads(), wall_s=time.perf_counter() - started)
    print(header + to_markdown(table))
    return stem.with_suffix(".csv")


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))
