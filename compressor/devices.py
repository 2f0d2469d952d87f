"""Compute devices named on the command line, checked before any work starts."""

from __future__ import annotations

import torch

from compressor.errors import CompressorError

KINDS = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str) -> str:
    """`name` if torch can compute on it here; otherwise a one-line error saying what exists."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CompressorError(f"unknown device {name!r}", f"use one of: {', '.join(available())}") from None
    if device.type not in KINDS:
        raise CompressorError(f"unsupported device {name!r}", f"use one of: {', '.join(available())}")
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise CompressorError(f"device {name!r} is not available on this machine (no {device.type.upper()} "
                              "device or no torch build for it)", f"use one of: {', '.join(available())}")
    if device.index is not None and device.index >= backend.device_count():
        raise CompressorError(f"device {name!r} does not exist ({backend.device_count()} {device.type} devices)",
                              f"use one of: {', '.join(available())}")
    return name


def available() -> list[str]:
    names = ["cpu"]
    for kind in KINDS[1:]:
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            names += [kind] + [f"{kind}:{i}" for i in range(backend.device_count())]
    return names
