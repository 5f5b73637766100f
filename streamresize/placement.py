"""The memory planner: from tensor shapes and the budgets (`--max-gpu-memory`, `--max-cpu-memory`), the
micro-batch size, where the activation cache lives, and how the next block is prefetched.

Everything here is arithmetic on sizes, decided before any weight is loaded, so `streamresize plan`
prints exactly what `compress` will do and the decisions can be tested with given budgets. The
sizes are upper bounds of what the engine holds at once (every narrowed width taken at full width).
"""

import re
from dataclasses import asdict, dataclass

from .arch.base import BlockShape
from .errors import StreamResizeError

HEADROOM = 0.9  # plan against 90 % of a budget: allocator fragmentation, CUDA context, small tensors
HOST_BASE = 400 * 2**20  # the process itself: Python, torch, transformers (about 320 MB measured) and slack
DEFAULT_CPU_SHARE = 0.8  # without --max-cpu-memory: this share of the machine's RAM
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text, option="size"):
    """'20GiB', '12GB', '512MiB', '3e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text), re.I)
    if not match or match.group(2).upper() not in UNITS:
        raise StreamResizeError(f"{option} {text}: expected a size like 20GiB, 12GB or 500MB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def format_size(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def machine_memory():
    """Total RAM in bytes (MemTotal), or None where /proc/meminfo does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_gpu_budget(device):
    """The GPU's total memory: a total, not what is free now, so a resumed run plans the same
    micro-batch as the first."""
    import torch

    if not torch.cuda.is_available():
        raise StreamResizeError(f"{device}: no CUDA device here; pass --max-gpu-memory to plan for one")
    return torch.cuda.get_device_properties(device).total_memory


def default_cpu_budget():
    ram = machine_memory()
    return int(ram * DEFAULT_CPU_SHARE) if ram else 64 * 2**30


@dataclass
class Footprint:
    """Bytes the engine needs, per kind of memory (upper bounds)."""

    step: int  # the peak of a block outside its calibration passes (transforms, solves, writing)
    pass_fixed: int  # held during a calibration pass, besides the micro-batch
    per_sequence: int  # one calibration sequence's share of a micro-batch
    cache: int  # the three activation cache files
    block_stored: int  # one block's tensors as stored (what a prefetch in memory holds)


def footprint(config, width, stored_bytes, compute_bytes, output_bytes, num_sequences, seq_length, narrow_mlp,
              cache_files=3, mlp_in_files=False, bases=True):
    """The engine's memory from a Llama-family config and the widest residual point kept (`width`);
    see `_block_step` for what is held when. `mlp_in_files`: the MLP neurons' d_ff² matrices live in
    memory-mapped files (the CPU), so only d x d_ff ones count. `bases`: False where every residual
    point is kept whole (no bases, no residual statistics, no point solves)."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    k, c = width, compute_bytes
    narrowed = k * (2 * q + 2 * kv + 3 * ff + 2 * k)  # a narrowed block's weights, skip paths included
    held = (block_parameters(config) * c  # the calibration layer's weights
            + ((d * q + d * ff) * 4 if c != 4 else 0)  # o_proj and down_proj as read, rotated at the end
            + (q + 2 * kv + 2 * ff) * k * output_bytes  # narrowed readers, kept as written
            + (5 * 8 * d * k if bases else 0))  # bases of three points and their float32 copies
    step = held + max(12 * ff * d + 8 * ff * k,  # one transform in flight: float32 source, float64 fold, product
                      4 * 8 * d * d if bases else 0,  # a point's solve: Gram matrix and workspace
                      (3 * 8 * ff * (d if mlp_in_files else ff)) if narrow_mlp else 0,  # the MLP neurons' solve
                      (q + ff + 2 * k) * k * 8 + narrowed * output_bytes)  # rotated writers, shard written
    vocabulary = vocab * d * 4 + vocab * k * (8 + output_bytes) + 16 * 4096 * d  # embedding / head steps
    per_token = max(44 * d + c * (3 * q + 3 * kv),  # attention pass: input, norm, q/k/v, update, signal, stats
                    52 * d + 4 * c * ff,  # MLP pass: narrowed input, gate/up/act, update, signal, stats
                    8 * d + (4 * c + 16) * ff if narrow_mlp else 0)  # MLP neurons' pass and statistics
    return Footprint(step=max(step, vocabulary),
                     pass_fixed=held + 8 * (ff * ff if narrow_mlp and not mlp_in_files else d * d if bases else 0),
                     per_sequence=per_token * seq_length, cache=cache_files * num_sequences * seq_length * d * 4,
                     block_stored=block_parameters(config) * stored_bytes)


def block_parameters(config):
    """A dense block's parameters: its linears and its two norms."""
    shape = BlockShape.from_config(config)
    return shape.parameters(shape.full) + 2 * shape.hidden


@dataclass
class Placement:
    batch_size: int  # sequences per micro-batch
    cache: str  # device | pinned | disk
    prefetch: str  # memory | page-cache | off
    device_bytes: int  # planned peak on the compute device (for the CPU: of this process's RAM)
    host_bytes: int  # planned peak of host RAM besides the device (GPU runs)

    def as_dict(self):
        return asdict(self)


def place(fp, device_type, gpu_budget, cpu_budget, max_batch, cache="auto", prefetch=True):
    """Largest micro-batch (at most max_batch) that fits, then the fastest cache location that fits
    beside it (device, pinned host memory, disk), then the next block prefetched into memory if it fits
    (else through the page cache).

    On the CPU everything shares `cpu_budget`; on a GPU the block and micro-batch use `gpu_budget`, and
    host RAM holds the process, a pinned cache and the prefetched blocks.
    """
    on_gpu = device_type == "cuda"
    option = "--max-gpu-memory" if on_gpu else "--max-cpu-memory"
    budget = gpu_budget if on_gpu else cpu_budget
    usable, host_usable = int(HEADROOM * budget), int(HEADROOM * cpu_budget)
    base = 0 if on_gpu else HOST_BASE
    fits = (usable - base - fp.pass_fixed) // fp.per_sequence
    if fits < 1 or base + fp.step > usable:
        raise StreamResizeError(
            f"{option} {format_size(budget)} is too small: a block needs {format_size(base + max(fp.step, fp.pass_fixed))}"
            f" plus {format_size(fp.per_sequence)} per calibration sequence (planned within {HEADROOM:.0%} of the "
            f"budget); raise {option} or lower --max-seq-length")
    batch = int(min(max_batch, fits))
    device_used = base + max(fp.step, fp.pass_fixed + batch * fp.per_sequence)
    host_used = HOST_BASE if on_gpu else device_used

    pinned_cache = 3 * pinned_size(fp.cache // 3)
    if cache == "auto":
        if device_used + fp.cache <= usable:
            cache = "device"
        elif on_gpu and host_used + pinned_cache <= host_usable:
            cache = "pinned"
        else:
            cache = "disk"
    if cache == "pinned" and not on_gpu:
        raise StreamResizeError("--cache-location pinned needs a CUDA device; choose device or disk")
    if cache == "device":
        device_used += fp.cache
    elif cache == "pinned":
        host_used += pinned_cache
    if not on_gpu:
        host_used = device_used

    mode = "off"
    if prefetch:  # up to two blocks: the rest of the current one and all of the next
        blocks = 2 * fp.block_stored * (2 if on_gpu else 1)  # pinned tensors: sizes rounded up
        mode = "memory" if host_used + blocks <= host_usable else "page-cache"
        host_used += blocks if mode == "memory" else 0
    if not on_gpu:
        device_used = host_used
    return Placement(batch_size=batch, cache=cache, prefetch=mode, device_bytes=device_used,
                     host_bytes=host_used if on_gpu else 0)


def pinned_size(n):
    """Pinned host memory comes from PyTorch's caching host allocator in powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class MemoryOptions:
    """How much memory a run may use, and how: run settings, not part of the recipe, so a run that ran
    out of memory resumes with a smaller budget instead of starting over."""

    max_gpu_memory: str | int | None = None
    max_cpu_memory: str | int | None = None
    cache_location: str = "auto"  # auto | device | pinned | disk
    prefetch: bool = True

    def budgets(self, device):
        """(GPU bytes or None, CPU bytes): the options where given, else the defaults."""
        gpu = None
        if self.max_gpu_memory is not None:
            gpu = parse_size(self.max_gpu_memory, "--max-gpu-memory")
        elif device.type == "cuda":
            gpu = default_gpu_budget(device)
        cpu = default_cpu_budget() if self.max_cpu_memory is None else parse_size(self.max_cpu_memory,
                                                                                  "--max-cpu-memory")
        return gpu, cpu

    def describe(self, kind):
        given = self.max_gpu_memory if kind == "gpu" else self.max_cpu_memory
        if given is not None:
            return str(given)
        return "the GPU's total memory" if kind == "gpu" else f"{DEFAULT_CPU_SHARE:.0%} of RAM"
