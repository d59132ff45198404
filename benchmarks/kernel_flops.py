"""Wall time and executed FLOPs of one attention layer: SDPA, eager full rank, low-rank kernels.

One layer with SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim 64),
batch 1, causal, random Q/K/V, one segment of ``L`` queries over ``L`` keys. Side by side:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal=True``), with the
  key/value heads repeated for grouped-query attention inside the timed call;
- ``full``: our eager :func:`~drrl_env.lm.attention.full_attention` (additive causal mask);
- ``gram``, ``svd``, ``calibrated`` at each rank: the kernels exactly as the model runs them,
  through :meth:`~drrl_env.lm.attention.RankController.attend` (``gram`` includes its Gram
  matrices and ``eigh``, ``svd`` its two SVDs, ``calibrated`` uses a fixed random orthonormal
  basis).

Wall time is the median of ``repeats`` timed calls after ``warmup`` untimed ones; from
``L >= long_length`` on, ``long_repeats`` calls after ``long_warmup`` (on CPU the kernels are
warm from the shorter lengths by then), so a CPU run stays short. FLOPs come from
:mod:`drrl_env.flops` (dense counts: the causal half is not skipped in the count, whatever a
fused kernel skips). ``cos_vs_full`` is the mean cosine of each kernel's output against the
eager full-rank output on the same inputs; random Q/K have a flat spectrum, so low-rank
fidelity here says nothing about a trained model.

The kernels and the timing come from :mod:`drrl_env.lm.kernel_timing`. Writes
``kernel_flops_<device type>.csv`` and ``.md`` under ``out_dir`` and prints the table.

Example:
    python benchmarks/kernel_flops.py --lengths 512 1024 --repeats 3
"""

from __future__ import annotations

import csv
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from drrl_env.flops import flops_ratio
from drrl_env.lm.kernel_timing import (
    AttentionShape,
    Kernel,
    KernelSpec,
    attention_kernels,
    full_flops,
    time_call,
)
from drrl_env.lm.measure import output_cosine

LOWRANK_METHODS = ("gram", "svd", "calibrated")

COLUMNS = (
    "device",
    "L",
    "kernel",
    "rank",
    "time_ms",
    "time_vs_sdpa",
    "gflops",
    "flops_vs_full",
    "cos_vs_full",
    "warmup",
    "repeats",
)


@dataclass(frozen=True)
class Args:
    """Single-layer attention benchmark: wall time and executed FLOPs per kernel."""

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    """Sequence lengths L (queries = keys = L)."""
    ranks: tuple[int, ...] = (16, 32)
    """Ranks of the low-rank kernels."""
    heads: int = 9
    """Query heads (SmolLM2-135M: 9)."""
    kv_heads: int = 3
    """Key/value heads (SmolLM2-135M: 3)."""
    head_dim: int = 64
    """Head dimension d (SmolLM2-135M: 64)."""
    warmup: int = 1
    """Untimed calls before timing each kernel."""
    repeats: int = 5
    """Timed calls per kernel (median reported) for L < long_length."""
    long_repeats: int = 2
    """Timed calls per kernel for L >= long_length (keeps CPU runs short)."""
    long_warmup: int = 0
    """Untimed calls per kernel for L >= long_length, CPU, once a shorter L has warmed them."""
    long_length: int = 4096
    """From this L on, use long_repeats and long_warmup."""
    seed: int = 0
    """Seed of the random Q/K/V and of the calibrated basis."""
    out_dir: Path = Path("results/benchmarks")
    """Where kernel_flops_<device type>.csv and .md are written."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Torch device (cuda when present, else cpu)."""


def shape_of(args: Args) -> AttentionShape:
    """The attention heads of ``args``."""
    return AttentionShape(args.heads, args.kv_heads, args.head_dim)


def kernels_for(args: Args, length: int, device: torch.device) -> list[Kernel]:
    """All kernels at sequence length ``length``, on the same random inputs."""
    specs = [KernelSpec(method, rank) for method in LOWRANK_METHODS for rank in args.ranks]
    return attention_kernels(shape_of(args), length, specs, device, args.seed)


def benchmark(args: Args) -> list[dict]:
    """Run every kernel at every length; one dict per (L, kernel, rank)."""
    device = torch.device(args.device)
    rows: list[dict] = []
    progress = tqdm(total=len(args.lengths) * (2 + 3 * len(args.ranks)), desc="kernels")
    with torch.inference_mode():
        for index, length in enumerate(args.lengths):
            long = length >= args.long_length
            repeats = args.long_repeats if long else args.repeats
            warm = long and index > 0 and device.type == "cpu"
            warmup = args.long_warmup if warm else args.warmup
            measured = []  # (kernel, seconds, output)
            for kernel in kernels_for(args, length, device):
                progress.set_postfix_str(f"L={length} {kernel.name} r={kernel.rank}")
                measured.append((kernel, *time_call(kernel.call, warmup, repeats, device)))
                progress.update()
            seconds_of = {k.name: s for k, s, _ in measured}
            reference = next(out for k, _, out in measured if k.name == "full")
            full = full_flops(shape_of(args), length)
            for kernel, seconds, output in measured:
                rows.append(
                    {
                        "device": device.type,
                        "L": length,
                        "kernel": kernel.name,
                        "rank": kernel.rank,
                        "time_ms": 1e3 * seconds,
                        "time_vs_sdpa": seconds / seconds_of["sdpa"],
                        "gflops": kernel.flops.total / 1e9,
                        "flops_vs_full": flops_ratio(kernel.flops, full),
                        "cos_vs_full": output_cosine(output, reference),
                        "warmup": warmup,
                        "repeats": repeats,
                    }
                )
            del measured, reference
    progress.close()
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the rows with full precision."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def _format(column: str, value: str) -> str:
    if column == "time_ms":
        return f"{float(value):.2f}"
    if column in ("time_vs_sdpa", "flops_vs_full", "gflops"):
        return f"{float(value):.3f}"
    if column == "cos_vs_full":
        return f"{float(value):.4f}"
    return value


def markdown_from_csv(csv_path: Path) -> str:
    """Render the benchmark CSV as a Markdown table (numbers rounded for reading)."""
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(COLUMNS)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for entry in rows:
        lines.append("| " + " | ".join(_format(c, entry[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    """Run the benchmark, write the CSV and Markdown, print the table."""
    if args.heads % args.kv_heads:
        raise ValueError(f"kv_heads={args.kv_heads} must divide heads={args.heads}")
    started = time.perf_counter()
    rows = benchmark(args)
    device_type = torch.device(args.device).type
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / f"kernel_flops_{device_type}.csv"
    write_csv(rows, csv_path)
    header = (
        f"One attention layer, {args.heads} query heads, {args.kv_heads} kv heads, "
        f"d={args.head_dim}, batch 1, causal, float32; device {device_type} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads). time_ms: median of `repeats` timed calls after "
        "`warmup` untimed ones (kernels already warm from the shorter L when warmup is 0). "
        "FLOPs from drrl_env.flops (dense causal count, subspace cost included); cos_vs_full: "
        "output cosine vs eager full rank on random Q/K/V.\n\n"
    )
    markdown = header + markdown_from_csv(csv_path)
    (args.out_dir / f"kernel_flops_{device_type}.md").write_text(markdown)
    print(markdown)
    print(f"total wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
