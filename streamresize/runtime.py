"""Small facts about the running process that the pipeline and the methods both use."""

import os
import resource

import torch


def resolve_device(name):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_mb(device):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, gpu


def crash_point(block, phase):
    """Test hook: STREAMRESIZE_CRASH_AT=BLOCK:PHASE kills the process there, as a power cut would."""
    if os.environ.get("STREAMRESIZE_CRASH_AT") == f"{block}:{phase}":
        os._exit(75)
