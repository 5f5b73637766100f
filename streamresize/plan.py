"""`streamresize plan`: what a run will need, from the checkpoint's headers and the recipe alone,
before any weight is loaded: per step the bytes read, cache, micro-batch and statistics memory, the
placement, the output written, the disk needed (checked against free space), and an estimate of time
from this device's measured throughput. `compress` makes the same plan and the same disk check.
"""

import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from .errors import StreamResizeError
from .placement import footprint, format_size, place

SAFETENSORS_OVERHEAD = 64 << 10  # header and alignment per shard, generously


@dataclass
class MethodFootprint:
    """What the planner needs to know of a method's run, as plain data (`WidthMethod.footprint`)."""

    widths: list  # residual width at every point (2 x blocks + 1)
    intermediate_sizes: list  # MLP width per block
    tied_head: bool
    cache_files: int  # full-width activation-cache files the method keeps
    shortcuts: bool  # skip-path matrices between points
    rotated: list  # per point: whether weights are rotated (not merely selected) there
    eigh_points: list  # per point: whether the method's own solve is an eigen-decomposition
    refit_readers: bool  # least-squares readers: an extra pass per point
    mlp_in_files: bool = False  # the MLP neurons' d_ff² Gram and solve in memory-mapped files (not counted)
    mlp_obs: bool = False  # MLP neurons chosen by structured OBS (a d_ff² inverse and its updates)
    kept_whole: bool = False  # every residual point kept whole: no bases, no residual statistics
    sensitivity_bytes: int = 0  # work-dir files of the loss-sensitivity pass at its largest (sensitivity.py)


@dataclass
class Step:
    name: str
    read_bytes: int  # tensors read from the checkpoint, as stored
    statistics_bytes: int  # float64 moments of the step's points, on the device while accumulated
    output_bytes: int  # tensors written to the step's shard (output dtype)
    flops: dict = field(default_factory=dict)  # by kind: compute, float32, float64, eigh (count of d)
    seconds: float | None = None


@dataclass
class Plan:
    model_dir: str
    out_dir: str
    work_dir: str
    device: str
    compute_dtype: str
    budgets: dict
    placement: object
    footprint: object
    micro_batch_bytes: int
    cache_bytes: int
    steps: list
    output_bytes: int
    work_bytes: int
    disk: list  # (path, bytes needed now, free bytes)
    throughput: dict | None = None

    @property
    def seconds(self):
        known = [s.seconds for s in self.steps if s.seconds is not None]
        return sum(known) if known else None

    def as_dict(self):
        return {"model": self.model_dir, "output": self.out_dir, "work_dir": self.work_dir, "device": self.device,
                "compute_dtype": self.compute_dtype, "budgets": self.budgets, "placement": self.placement.as_dict(),
                "micro_batch_bytes": self.micro_batch_bytes, "cache_bytes": self.cache_bytes,
                "output_bytes": self.output_bytes, "work_bytes": self.work_bytes,
                "disk": [{"path": p, "needed": n, "free": f} for p, n, f in self.disk],
                "throughput": self.throughput, "seconds": self.seconds,
                "steps": [{"name": s.name, "read_bytes": s.read_bytes, "statistics_bytes": s.statistics_bytes,
                           "output_bytes": s.output_bytes, "seconds": s.seconds} for s in self.steps]}


def make_plan(compressor, measure=False):
    """The plan of `compressor`'s run (a pipeline.Run after __init__: shapes, recipe, the method's footprint)."""
    c, r = compressor, compressor.recipe
    m = c.method.footprint()
    config = c.source_config
    d, ff = c.hidden, config["intermediate_size"]
    n, seq = r.num_calibration_samples, r.max_seq_length
    dist = getattr(c, "dist", None)
    if dist is not None:  # a data-parallel run: this process holds and computes its share of the sequences
        n = dist.max_rows(n)
    narrow_mlp = any(k < ff for k in m.intermediate_sizes)
    fp = footprint(config, max(m.widths), c.reader.dtype.itemsize, c.compute_dtype.itemsize, c.out_dtype.itemsize,
                   n, seq, narrow_mlp, m.cache_files, mlp_in_files=m.mlp_in_files, bases=not m.kept_whole)
    gpu, cpu = c.memory.budgets(c.device)
    if dist is not None and c.memory.max_cpu_memory is None and dist.local_world > 1:
        cpu //= dist.local_world  # the default share of RAM is split between the processes of a node
    placement = place(fp, c.device.type, gpu, cpu, r.batch_size, c.memory.cache_location, c.memory.prefetch)
    steps = [_embedding(c, m, n * seq)] + [_block(c, m, i, n * seq) for i in range(c.num_layers)] + [_head(c, m)]
    output = sum(s.output_bytes + SAFETENSORS_OVERHEAD for s in steps)
    k_max = max(m.widths)
    work = (fp.cache + n * seq * 8  # cache files, calibration ids
            + 8 * max(d + 2, ff + 2 if narrow_mlp else 0) * max(d, ff if narrow_mlp else 0)  # offloaded stats
            + 4 * 8 * d * k_max + 8 * d * k_max  # basis files of two steps (basis and reader), shared basis
            + m.sensitivity_bytes)
    plan = Plan(model_dir=c.model_dir, out_dir=c.out_dir, work_dir=c.work_dir, device=str(c.device),
                compute_dtype=str(c.compute_dtype).replace("torch.", ""), budgets={"gpu": gpu, "cpu": cpu},
                placement=placement, footprint=fp, micro_batch_bytes=placement.batch_size * fp.per_sequence,
                cache_bytes=fp.cache, steps=steps, output_bytes=output, work_bytes=work,
                disk=_disk_needs(c.out_dir, output if getattr(c, "is_writer", True) else 0, c.work_dir, work))
    if measure and (c.device.type != "cuda" or torch.cuda.is_available()):
        plan.throughput = measure_throughput(c.device, c.compute_dtype, eigh_size=min(d, 1024))
        for step in steps:
            step.seconds = estimate_seconds(step.flops, plan.throughput, d)
    return plan


def _group_bytes(c, names):
    return sum(c.reader.nbytes(name) for name in names if c.reader.has(name))


def _embedding(c, m, tokens):
    k0, d = m.widths[0], c.hidden
    vocab = c.source_config["vocab_size"]
    gram_flops = 0 if m.kept_whole else 2 * tokens * d * d + 2 * tokens * d * k0  # its Gram, the projection
    return Step("embedding", read_bytes=_group_bytes(c, [c.family.embedding]),
                statistics_bytes=0 if m.kept_whole else _stats(d), output_bytes=vocab * k0 * c.out_dtype.itemsize,
                flops={"float64": gram_flops + _rotation(m, 0, vocab * d * k0),
                       "eigh": _solves(m, [0])})


def _block(c, m, i, tokens):
    config, d = c.source_config, c.hidden
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    ff, ff_i = config["intermediate_size"], m.intermediate_sizes[i]
    k_in, k_attn, k_mlp = m.widths[2 * i], m.widths[2 * i + 1], m.widths[2 * i + 2]
    seq = c.recipe.max_seq_length
    shortcuts = m.shortcuts
    output = ((q + 2 * kv) * k_in + k_attn * q + 2 * ff_i * k_attn + k_mlp * ff_i
              + (k_attn * k_in + k_mlp * k_attn if shortcuts else 0))
    narrow = ff_i < ff
    compute = 2 * tokens * ((q + 2 * kv) * k_in + q * k_attn + 3 * ff * k_attn) + 2 * tokens * seq * q
    compute += 4 * tokens * ff * k_attn if narrow else 0  # the MLP neurons' extra pass
    float32 = 0 if m.kept_whole else 2 * tokens * d * (k_in + 3 * k_attn)  # signals through the bases
    residual = 0 if m.kept_whole else 4 * tokens * d * d + 2 * tokens * d * k_mlp  # two points' Grams, the projection
    float64 = (residual
               + (2 * tokens * ff * ff if narrow else 0)
               + _rotation(m, 2 * i, (q + 2 * kv) * d * k_in) + _rotation(m, 2 * i + 1, (q + 3 * ff) * d * k_attn)
               + _rotation(m, 2 * i + 2, ff * d * k_mlp))
    if m.refit_readers and not m.kept_whole:
        float64 += 2 * tokens * (k_attn + k_mlp) * (d + max(k_attn, k_mlp))
    if narrow:
        float64 += mlp_solve_flops(d, ff, ff_i, m.mlp_obs)
    eigh = _solves(m, [2 * i + 1, 2 * i + 2])
    return Step(f"block {i}", read_bytes=_group_bytes(c, _block_names(c, i)),
                statistics_bytes=(0 if m.kept_whole else _stats(d)) + (_stats(ff) if narrow else 0),
                output_bytes=output * c.out_dtype.itemsize,
                flops={"compute": compute, "float32": float32, "float64": float64, "eigh": eigh})


def mlp_solve_flops(d, ff, kept, obs):
    """Float64 FLOPs of narrowing one MLP from ff to `kept` neurons: with OBS, the Cholesky factor and
    inverse of the ff² Gram (ff³) and the greedy updates of H⁻¹ and W; then the least-squares refit of
    down_proj (D H[:, S], a kept² factorization and its solve). 3.9e12 for a 7B MLP at 80 %, 117 s on
    a 2-core CPU (BENCHMARKS.md)."""
    removed = ff - kept
    selection = ff ** 3 + 2 * ff * ff * removed + 2 * d * ff * removed if obs else 0
    return selection + 2 * d * ff * kept + kept ** 3 / 3 + 2 * kept * kept * d


def _head(c, m):
    d, vocab = c.hidden, c.source_config["vocab_size"]
    k0, k_last = m.widths[0], m.widths[-1]
    output = k0 * k_last if m.tied_head else vocab * k_last
    return Step("head", read_bytes=_group_bytes(c, _head_names(c, m)), statistics_bytes=0,
                output_bytes=output * c.out_dtype.itemsize,
                flops={"float64": _rotation(m, len(m.widths) - 1, output * d)})


def _head_names(c, m):
    f = c.family
    head = f.head if c.reader.has(f.head) else f.embedding
    return [f.final_norm] + ([head] if not m.tied_head else [])


def _block_names(c, i):
    prefix = c.family.block.format(i=i)
    return [n for n in c.reader.weight_map if n.startswith(prefix)]


def _stats(width):
    return 8 * (width * width + 2 * width)


def _rotation(m, point, flops):
    """float64 flops of rotating weights by a point's basis: none for a selection (pruning, identity)."""
    return 2 * flops if m.rotated[point] else 0


def _solves(m, points):
    """Eigen-solves of d x d matrices: the method's own and the logged PCA bound's (about 0.3 of one)."""
    return sum((1.0 if m.eigh_points[point] else 0.0) + 0.3 for point in points)


def _disk_needs(out_dir, output, work_dir, work):
    """(path, bytes still needed, free bytes) per file system; what the run's directories already hold
    (a resumed run, an output being replaced) counts as available."""
    needs = {}
    for path, total in ((out_dir, output), (work_dir, work)):
        existing = _allocated(path)
        anchor = _existing_parent(path)
        device = os.stat(anchor).st_dev
        prev = needs.get(device, (anchor, 0, 0))
        needs[device] = (prev[0], prev[1] + max(0, total - existing), shutil.disk_usage(anchor).free)
    return list(needs.values())


def _existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _allocated(path):
    total = 0
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def check_disk(plan):
    for path, needed, free in plan.disk:
        if needed > free:
            raise StreamResizeError(
                f"{path}: not enough disk space: the run needs {format_size(needed)} more for the output "
                f"({plan.out_dir}) and work dir ({plan.work_dir}), {format_size(free)} is free; free space "
                "or choose another OUT_DIR / --work-dir")


def measure_throughput(device, dtype, size=1024, eigh_size=1024):
    """Measured on this device: matmul FLOP/s in the compute dtype, float32 and float64, and the seconds
    of one float64 eigen-solve of eigh_size (scaled by the cube of the width). Best of a few runs: a
    shared machine only ever makes them slower."""

    def timed(fn, repeats=3):
        fn()
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    rates = {}
    for kind, dt in (("compute", dtype), ("float32", torch.float32), ("float64", torch.float64)):
        a = torch.randn(size, size, device=device).to(dt)
        rates[kind] = 2 * size ** 3 / timed(lambda: a @ a)
    g = torch.randn(eigh_size, eigh_size, dtype=torch.float64, device=device)
    g = g @ g.T
    rates["eigh_seconds"] = timed(lambda: torch.linalg.eigh(g), repeats=2)
    rates["eigh_size"] = eigh_size
    return rates


def estimate_seconds(flops, rates, width):
    seconds = sum(flops.get(kind, 0) / rates[kind] for kind in ("compute", "float32", "float64"))
    return seconds + flops.get("eigh", 0) * rates["eigh_seconds"] * (width / rates["eigh_size"]) ** 3


def format_plan(plan, compressor):
    c, p, fp = compressor, plan.placement, plan.footprint
    m = c.method.footprint()
    lines = [f"model {plan.model_dir}: {c.family.name}, {c.num_layers} blocks, width {c.hidden}, MLP "
             f"{c.source_config['intermediate_size']}, {format_size(_total_read(plan))} as "
             f"{str(c.reader.dtype).replace('torch.', '')}",
             f"run: {c.recipe.method}, residual widths {min(m.widths)}-{max(m.widths)}, MLP widths "
             f"{min(m.intermediate_sizes)}-{max(m.intermediate_sizes)}, calibration "
             f"{c.recipe.num_calibration_samples} x {c.recipe.max_seq_length} tokens",
             f"device {plan.device}, compute {plan.compute_dtype}, statistics summed in float64 (Gram products "
             f"{str(getattr(c, 'statistics_products', 'float64')).replace('torch.', '')}); budgets: GPU "
             f"{format_size(plan.budgets['gpu']) if plan.budgets['gpu'] else '-'} "
             f"({c.memory.describe('gpu')}), CPU {format_size(plan.budgets['cpu'])} ({c.memory.describe('cpu')})",
             f"placement: micro-batch {p.batch_size} sequences ({format_size(plan.micro_batch_bytes)}), activation "
             f"cache ({format_size(plan.cache_bytes)}) on {_where(p.cache, plan.device)}, prefetch {p.prefetch}; "
             f"planned peak {format_size(p.device_bytes)} on {plan.device}"
             + (f", {format_size(p.host_bytes)} host RAM" if p.host_bytes else ""),
             "",
             f"{'step':<11} {'read':>11} {'cache':>11} {'micro-batch':>12} {'statistics':>11} {'output':>11} "
             f"{'placement':>16} {'est. time':>10}"]
    for s in plan.steps:
        where = f"{p.cache}/{p.batch_size}"
        lines.append(f"{s.name:<11} {format_size(s.read_bytes):>11} {format_size(plan.cache_bytes):>11} "
                     f"{format_size(plan.micro_batch_bytes):>12} {format_size(s.statistics_bytes):>11} "
                     f"{format_size(s.output_bytes):>11} {where:>16} {_duration(s.seconds):>10}")
    lines.append(f"{'total':<11} {format_size(_total_read(plan)):>11} {'':>11} {'':>12} {'':>11} "
                 f"{format_size(sum(s.output_bytes for s in plan.steps)):>11} {'':>16} {_duration(plan.seconds):>10}")
    lines.append("")
    for path, needed, free in plan.disk:
        verdict = "ok" if needed <= free else "NOT ENOUGH"
        lines.append(f"disk at {path}: needs {format_size(needed)} more, {format_size(free)} free: {verdict}")
    lines.append(f"  (output {format_size(plan.output_bytes)} in {plan.out_dir}; work dir "
                 f"{format_size(plan.work_bytes)} in {plan.work_dir}, removed at the end)")
    if not plan.throughput:
        lines.append(f"time estimate: not measured ({plan.device} is not available here)")
    else:
        t = plan.throughput
        compute = f"{t['compute'] / 1e9:.0f} GFLOP/s in {plan.compute_dtype}, " if plan.compute_dtype != "float32" else ""
        lines.append(f"time estimate from this device: matmul {compute}{t['float32'] / 1e9:.0f} GFLOP/s in float32, "
                     f"{t['float64'] / 1e9:.0f} in float64; eigh "
                     f"{t['eigh_size']} in {t['eigh_seconds'] * 1e3:.0f} ms; disk reads overlap compute and "
                     "are not counted")
    return "\n".join(lines)


def _total_read(plan):
    return sum(s.read_bytes for s in plan.steps)


def _where(cache, device):
    if cache == "device":
        return "the GPU" if device.startswith("cuda") else "RAM"
    return {"pinned": "pinned host RAM", "disk": "disk (memory-mapped)"}[cache]


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds >= 90:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"
