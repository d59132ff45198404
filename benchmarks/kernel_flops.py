"""Wall time and executed FLOPs of one attention layer: SDPA, eager exact, every method's paths.

One layer with SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head dim
64), batch 1, causal, random Q/K/V, one segment of ``L`` queries over ``L`` keys. Side by
side in one run, on the same inputs:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal=True``);
- ``full``: our eager exact attention (additive causal mask);
- each method at each setting, on each of its paths: ``fast`` (the kernel the model runs:
  eager matmuls for the dense low-rank methods, the gather for ``topk``), ``fused``
  (FlexAttention, compiled: low-rank scores with ``A V`` at the head dim, or the block mask
  of ``topk-block``; for ``full``, exact attention in the same FlexAttention kernel, the
  dense fused baseline) and, for ``topk``, its dense ``reference``; ``topp`` (top-p under the
  rank-r estimate: its ``keep`` is the mass ``p``) on its ``fast`` path. Every timed call
  includes the method's observation features (rotating or decomposing the new keys), as a
  layer call of the environment does. Calibrated methods use a random orthonormal basis.

Wall time is the median of ``repeats`` timed calls after ``warmup`` untimed ones; from
``L >= long_length`` on, ``long_repeats`` calls after ``long_warmup``. A kernel whose dense
``(H, L, L)`` tensors would exceed ``max_dense_gib`` is skipped (its row says so); the
fused and gather paths never build them. FLOPs come from each method's own count (dense
causal counts for dense kernels; kept keys or blocks for the sparse ones); a method whose
cost depends on the input (``topp``) counts what its last timed call executed
(``executed_flops``; the row's note says so). ``cos_vs_full`` is the output cosine against
exact attention on the same inputs (random Q/K have a flat spectrum: it says nothing of a
trained model's fidelity).

Writes ``kernel_flops_<device type>.csv``, ``.md`` and ``config.json`` in the run folder
``<out_dir>/<run_name>`` (``results/benchmarks/kernel_flops_<device type>`` by default) and
prints the table. A folder that holds a run is refused unless ``--overwrite`` is given.

Example:
    python benchmarks/kernel_flops.py --lengths 512 1024 --repeats 3
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from drrl_env.flops import FlopsBreakdown, flops_ratio
from drrl_env.lm.kernel_timing import (
    AttentionShape,
    Kernel,
    KernelSpec,
    attention_kernels,
    full_flops,
    time_call,
)
from drrl_env.lm.measure import output_cosine
from drrl_env.methods.base import CallShape
from harness.runs import ArgumentError, BenchmarkArgs, check_device, run_main

REALISED = "flops realised by the timed call"
"""The note of a row whose FLOPs depend on the input (the method's executed count)."""

COLUMNS = (
    "device",
    "L",
    "kernel",
    "path",
    "rank",
    "keep",
    "time_ms",
    "time_vs_sdpa",
    "gflops",
    "flops_vs_full",
    "cos_vs_full",
    "warmup",
    "repeats",
    "note",
)
DEFAULT_SPECS = (
    "full:64:1:fused",
    "gram:16:1:fast",
    "gram:16:1:fused",
    "svd:16:1:fast",
    "calibrated:16:1:fast",
    "calibrated:16:1:fused",
    "calibrated:32:1:fused",
    "topk:16:0.5:fast",
    "topk:16:0.25:fast",
    "topk:16:0.25:reference",
    "topk-block:16:0.5:fused",
    "topk-block:16:0.25:fused",
    "topp:16:0.9:fast",
    "topp:16:0.99:fast",
)


@dataclass(frozen=True)
class Args(BenchmarkArgs):
    """Single-layer attention benchmark: wall time and executed FLOPs per kernel and path."""

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    """Sequence lengths L (queries = keys = L)."""
    kernels: tuple[str, ...] = DEFAULT_SPECS
    """``method:rank:keep:path`` of each kernel besides sdpa and full."""
    heads: int = 9
    """Query heads (SmolLM2-135M: 9)."""
    kv_heads: int = 3
    """Key/value heads (SmolLM2-135M: 3)."""
    head_dim: int = 64
    """Head dimension d (SmolLM2-135M: 64)."""
    warmup: int = 1
    """Untimed calls before timing each kernel (compiles the fused ones)."""
    repeats: int = 5
    """Timed calls per kernel (median reported) for L < long_length."""
    long_repeats: int = 2
    """Timed calls per kernel for L >= long_length (keeps CPU runs short)."""
    long_warmup: int = 1
    """Untimed calls per kernel for L >= long_length."""
    long_length: int = 4096
    """From this L on, use long_repeats and long_warmup."""
    max_dense_gib: float = 12.0
    """Skip kernels whose dense (H, L, L) float32 tensors need more memory than this."""
    seed: int = 0
    """Seed of the random Q/K/V and of the calibrated bases."""
    run_name: str | None = None
    """Run folder inside out_dir (default ``kernel_flops_<device type>``)."""
    threads: int | None = None
    """Torch threads (default: torch's own choice)."""

    def __post_init__(self) -> None:
        if self.run_name is None:
            check_device(self.device)
            object.__setattr__(self, "run_name", f"kernel_flops_{torch.device(self.device).type}")
        super().__post_init__()


def parse_spec(text: str) -> KernelSpec:
    """``method:rank:keep:path`` as a :class:`KernelSpec` (ValueError naming the spec)."""
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"kernel {text!r} is not method:rank:keep:path")
    method, rank, keep, path = parts
    return KernelSpec(method, int(rank), float(keep), path)


def recording(kernel: Kernel) -> tuple[Kernel, Callable[[], FlopsBreakdown] | None]:
    """``kernel`` with a call that keeps its state, and the realised FLOPs of its last call.

    Only for a method whose cost depends on the input (not ``static_cost``): its FLOPs are
    then the method's :meth:`executed_flops` of the last timed call. Other kernels come back
    unchanged, with ``None`` (their static count stands).
    """
    captured = inspect.getclosurevars(kernel.call).nonlocals  # what method_call closes over
    method = captured.get("method")
    if method is None or method.static_cost:
        return kernel, None
    query, key, setting, run = (captured[k] for k in ("query", "key", "setting", "run"))
    inputs = (query, key, captured["value"], captured["mask"], captured["scaling"], setting)
    last: dict = {}

    def call() -> torch.Tensor:
        state = last["state"] = method.new_state(0)
        method.observe(state, query, key)
        return run(state, *inputs)

    def flops() -> FlopsBreakdown:
        return method.executed_flops(last["state"], CallShape.of(query, key), setting)

    return dataclasses.replace(kernel, call=call), flops


def benchmark(args: Args, on_length: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every kernel at every length; one dict per (L, kernel, path, setting).

    ``on_length`` receives the rows so far after each length (the script writes them, so an
    interrupted run keeps its finished lengths).
    """
    device = torch.device(args.device)
    shape = AttentionShape(args.heads, args.kv_heads, args.head_dim)
    specs = [parse_spec(text) for text in args.kernels]
    rows: list[dict] = []
    progress = tqdm(total=len(args.lengths) * (2 + len(specs)), desc="kernels")
    with torch.inference_mode():
        for length in args.lengths:
            long = length >= args.long_length
            repeats = args.long_repeats if long else args.repeats
            warmup = args.long_warmup if long else args.warmup
            measured = []  # (kernel, seconds or None, output or None, note)
            for kernel in attention_kernels(shape, length, specs, device, args.seed):
                progress.set_postfix_str(f"L={length} {kernel.name} r={kernel.rank}")
                gib = kernel.dense_bytes / 2**30
                if gib > args.max_dense_gib:
                    measured.append((kernel, None, None, f"skipped: dense tensors {gib:.1f} GiB"))
                else:
                    kernel, realised = recording(kernel)
                    seconds, output = time_call(kernel.call, warmup, repeats, device)
                    if realised is None:
                        measured.append((kernel, seconds, output, ""))
                    else:
                        kernel = dataclasses.replace(kernel, flops=realised())
                        measured.append((kernel, seconds, output, REALISED))
                progress.update()
            rows += rows_of(args, device, length, measured, warmup, repeats)
            del measured
            if on_length is not None:
                on_length(rows)
    progress.close()
    return rows


def rows_of(args, device, length, measured, warmup, repeats) -> list[dict]:
    """The table rows of one length; cosines against the exact output (eager, else SDPA)."""
    full = full_flops(AttentionShape(args.heads, args.kv_heads, args.head_dim), length)
    by_name = {kernel.name: (seconds, output) for kernel, seconds, output, _ in measured}
    sdpa_seconds = by_name["sdpa"][0]
    reference = by_name["full"][1] if by_name["full"][1] is not None else by_name["sdpa"][1]
    rows = []
    for kernel, seconds, output, note in measured:
        rows.append(
            {
                "device": device.type,
                "L": length,
                "kernel": kernel.name.split("[")[0],
                "path": kernel.path,
                "rank": kernel.rank,
                "keep": kernel.keep,
                "time_ms": math.nan if seconds is None else 1e3 * seconds,
                "time_vs_sdpa": math.nan if seconds is None else seconds / sdpa_seconds,
                "gflops": kernel.flops.total / 1e9,
                "flops_vs_full": flops_ratio(kernel.flops, full),
                "cos_vs_full": math.nan if output is None else output_cosine(output, reference),
                "warmup": warmup,
                "repeats": repeats,
                "note": note,
            }
        )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the rows with full precision."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def _format(column: str, value: str) -> str:
    if value in ("", "nan"):
        return "–"
    if column == "time_ms":
        return f"{float(value):.2f}"
    if column in ("time_vs_sdpa", "flops_vs_full", "gflops"):
        return f"{float(value):.3f}"
    if column == "cos_vs_full":
        return f"{float(value):.4f}"
    if column == "keep":
        return f"{float(value):g}"
    return value


def markdown_from_csv(csv_path: Path) -> str:
    """Render the benchmark CSV as a Markdown table (numbers rounded for reading)."""
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in COLUMNS if c != "device"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for entry in rows:
        lines.append("| " + " | ".join(_format(c, entry[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> Path:
    """Run the benchmark, write the CSV and Markdown, print the table."""
    if args.heads % args.kv_heads:
        raise ArgumentError(f"kv_heads={args.kv_heads} must divide heads={args.heads}")
    for text in args.kernels:  # every spec checked before the first timing
        try:
            parse_spec(text)
        except ValueError as error:
            raise ArgumentError(str(error)) from None
    folder = args.run_folder()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device_type = torch.device(args.device).type
    out = folder.prepare(asdict(args), torch=torch.__version__, device_type=device_type)
    csv_path = out / f"kernel_flops_{device_type}.csv"

    def write(rows: list[dict]) -> str:
        write_csv(rows, csv_path)
        header = (
            f"One attention layer, {args.heads} query heads, {args.kv_heads} kv heads, "
            f"d={args.head_dim}, batch 1, causal, float32; device {device_type} "
            f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads). time_ms: median of `repeats` timed calls after "
            "`warmup` untimed ones (the fused paths compile during the warmup). FLOPs from each "
            "method's count (features included); cos_vs_full: output cosine vs exact attention "
            f"on random Q/K/V. Total wall time {time.perf_counter() - started:.0f} s.\n\n"
        )
        markdown = header + markdown_from_csv(csv_path)
        (out / f"kernel_flops_{device_type}.md").write_text(markdown)
        return markdown

    print(write(benchmark(args, on_length=write)))
    folder.update_config(wall_s=time.perf_counter() - started, threads_used=torch.get_num_threads())
    return csv_path


if __name__ == "__main__":
    run_main(main, tyro.cli(Args))
