"""Hardware context for the SystemStatePacket, probed cheaply and failing open.

A probe that fails (no /proc, a CUDA query error) leaves the field at zero
rather than failing the hook: the packet is advisory.
"""

from __future__ import annotations

import torch

from leyline import HardwareContext

_GB = 1024**3


def _meminfo_gb() -> tuple[float, float]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0.0, 0.0

    def kb(key: str) -> float:
        return float(fields.get(key, "0 kB").split()[0]) * 1024 / _GB

    return kb("MemTotal"), kb("MemAvailable")


class HardwareProbe:
    """Fills `HardwareContext` for the training device."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._static = HardwareContext(device_type=device.type, device_id=str(device.index or 0))
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            self._static.total_memory_gb = props.total_memory / _GB
            self._static.compute_capability = props.major * 10 + props.minor

    def context(self) -> HardwareContext:
        ctx = HardwareContext()
        ctx.CopyFrom(self._static)
        try:
            if self._device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self._device)
                ctx.available_memory_gb = free / _GB
            else:
                ctx.total_memory_gb, ctx.available_memory_gb = _meminfo_gb()
        except (RuntimeError, OSError, ValueError):
            pass  # fail open: the packet is advisory
        return ctx
