"""Helpers shared by the benchmark scripts."""

import os
import platform


def machine() -> str:
    """The device, CPU model, torch version and thread count the numbers were measured on."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device} ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads"
