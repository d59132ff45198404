"""Torch devices: check one before any work, with a message that says what to do."""

from __future__ import annotations

CUDA_WHEELS = "https://download.pytorch.org/whl/cu126"
"""A wheel index of CUDA builds of torch, named in the error for a missing CUDA."""


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (imports torch when called)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else ValueError saying why and what to do.

    ``cuda`` without a CUDA build of torch or without a visible GPU names the install
    command of a CUDA wheel.
    """
    if not isinstance(device, str) or not device.strip():
        raise ValueError(
            f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}"
        )
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device: {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            version = torch.__version__.split("+")[0]
            build = (
                f"torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"
            )
            raise ValueError(
                f"device={device!r} but CUDA is not available: {build}. Use device='cpu', or "
                f"install a CUDA build of torch: pip install torch=={version} --index-url "
                f"{CUDA_WHEELS} (or the wheel index of your driver's CUDA version)"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}, but only {torch.cuda.device_count()} CUDA GPU(s) are visible"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device
