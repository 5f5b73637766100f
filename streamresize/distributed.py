"""Data-parallel compression: one model's calibration sequences split over the processes that
`torchrun` (or `accelerate launch`, which sets the same variables) starts.

Blocks depend on each other, so a run gets faster by splitting the sequences, not the layers. Rank r
of W owns the fixed, contiguous rows [r*n/W, (r+1)*n/W) of the calibration ids (every rank tokenizes
the same text the same way; the ids' checksum is compared across ranks) and keeps their hidden states
in its own activation cache: rank 0 in the work dir itself, exactly where a single process keeps it,
rank r > 0 in WORK/rank-0000r (so `--work-dir` may be node-local scratch while OUT_DIR is shared).

What crosses processes, and why it is enough:

- Statistics. Every method already sums its float64 statistics through `Run.reduce`,
  `reduce_tensors` and `reduce_count` (no-ops in one process); here those call `all_reduce(SUM)` on
  float64 tensors. What we rely on: for a fixed world size, tensor size and backend version, gloo's
  (and NCCL's) all-reduce follows a fixed schedule, so it is deterministic run to run, and it ends
  with every rank holding the same bytes (ring / tree reduce, then the same result distributed).
  The order differs from one process's micro-batch order, so sums differ from a single-process
  run's in the last bits, never between two runs with the same world size.
- Solves. Every rank solves from the same reduced statistics with the same code on the same kind
  of device, so every rank computes the same transform: nothing is broadcast (a broadcast of a
  13B block's transforms would cost more than the solve, and every rank needs them anyway to
  propagate its own sequences). That is checked, cheaply, at every step: an integer fingerprint of
  the step's output tensors (`fingerprint`) is compared across ranks, and a difference stops the
  run before the step is committed.
- Files. Only rank 0 writes shards, the manifest, the index and the card; every rank writes its own
  cache, the method's small resume files (bases) and its own progress marker, in its own folder.
- Commit. A step is committed in two collectives: (B) every rank's cache and marker for the next
  step are durable, the transforms agree, and any stop request is shared; then rank 0 saves the
  manifest; (D) the manifest is durable, and only then does any rank overwrite the previous step's
  inputs. So a kill anywhere leaves every rank's marker at the manifest's step or one ahead, with the
  manifest's cache file intact on every rank: all ranks resume at the manifest's step.
- Stopping. A signal on any rank is shared in (B), so every rank stops at the same step boundary and
  exits with EXIT_RESUMABLE.

Nothing here imports or initialises torch.distributed unless WORLD_SIZE is set.
"""

import contextlib
import hashlib
import json
import os
import time

from .errors import StreamResizeError

PROGRESS = "progress.json"  # a rank's own marker: the step its cache is durable for


def from_env(environ=None):
    """The process's place in a torchrun / accelerate launch (WORLD_SIZE, RANK, LOCAL_RANK), or None when
    WORLD_SIZE is unset: the single-process run, which touches nothing of torch.distributed."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise StreamResizeError(f"WORLD_SIZE / RANK / LOCAL_RANK: not whole numbers ({e})") from None
    if world < 1 or not 0 <= rank < world:
        raise StreamResizeError(f"RANK {rank} with WORLD_SIZE {world}: expected 0 <= RANK < WORLD_SIZE")
    return Dist(rank, world, local_rank, local_world)


def rank_dir_name(rank):
    return f"rank-{rank:05d}"


def share(n, rank, world):
    """Rows [start, end) of n sequences that `rank` of `world` owns."""
    return rank * n // world, (rank + 1) * n // world


class Dist:
    """One process of a data-parallel run: its rank, the collectives it takes part in, and what they cost."""

    def __init__(self, rank, world, local_rank=0, local_world=1):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.initialized = False
        self.backend = None
        self._comm_device = None
        self.seconds = 0.0  # time spent in collectives (since the last take_counters)
        self.bytes = 0  # bytes all-reduced (each rank's contribution)
        self.calls = 0

    @property
    def is_writer(self):
        return self.rank == 0

    def rows(self, n):
        return share(n, self.rank, self.world)

    def max_rows(self, n):
        """The largest share of any rank: what the memory planner sizes a rank's cache for."""
        return max(b - a for a, b in (share(n, r, self.world) for r in range(self.world)))

    def device(self, device):
        """The device this rank computes on: cuda:LOCAL_RANK for a CUDA run, else `device`."""
        import torch

        if device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, device):
        """Join the process group (rendezvous from MASTER_ADDR / MASTER_PORT, as torchrun sets them):
        nccl for a CUDA run, gloo on the CPU."""
        import datetime

        import torch
        import torch.distributed as td

        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._comm_device = device if self.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not td.is_initialized():
            minutes = float(os.environ.get("STREAMRESIZE_DIST_TIMEOUT_MINUTES", "60"))
            kwargs = {"device_id": device} if self.backend == "nccl" else {}
            td.init_process_group(self.backend, timeout=datetime.timedelta(minutes=minutes), **kwargs)
        if td.get_world_size() != self.world or td.get_rank() != self.rank:
            raise StreamResizeError(f"the process group has rank {td.get_rank()} of {td.get_world_size()}, "
                                    f"the environment says RANK {self.rank} of WORLD_SIZE {self.world}")
        self.initialized = True
        return self

    def close(self):
        if self.initialized:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.initialized = False

    # ---- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor, op="sum"):
        """Sum (or max) `tensor` over every rank, in place; a tensor on another device than the backend's
        goes through a copy. Timed and counted (`take_counters`)."""
        import torch.distributed as td

        start = time.perf_counter()
        target = tensor if tensor.device == self._comm_device else tensor.to(self._comm_device)
        td.all_reduce(target, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
        if target is not tensor:
            tensor.copy_(target)
        self.seconds += time.perf_counter() - start
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1
        return tensor

    def take_counters(self):
        """(seconds, bytes, calls) of collectives since the last call."""
        counters = (self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return counters

    def max_ints(self, values):
        """The largest of each integer over all ranks (one small all-reduce)."""
        import torch

        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        return [int(v) for v in self.all_reduce(t, op="max").tolist()]

    def barrier(self):
        self.max_ints([0])

    def agree(self, what, value, stop_signal=0):
        """Check that the integer `value` (a fingerprint) is the same on every rank, and share a stop
        request: returns the largest `stop_signal` (a signal number, 0 for none) of any rank. Raises when
        the values differ: the ranks computed different transforms, which must never be committed."""
        value &= (1 << 62) - 1
        high, neg_low, stop = self.max_ints([value, -value, stop_signal])
        if high != -neg_low:
            raise StreamResizeError(
                f"{what} differs between the ranks (fingerprints from {-neg_low} to {high}): the processes did "
                "not solve identically (different devices, libraries or settings?); nothing of this step was "
                "committed")
        return stop

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable object)."""
        import torch.distributed as td

        start = time.perf_counter()
        box = [obj]
        td.broadcast_object_list(box, src=0)
        self.seconds += time.perf_counter() - start
        return box[0]

    def gather(self, obj):
        import torch.distributed as td

        box = [None] * self.world
        td.all_gather_object(box, obj)
        return box

    @contextlib.contextmanager
    def guard(self, what):
        """A phase in which a rank may fail alone (rank 0 claiming the output, a rank missing its saved
        state): every rank learns of a failure at its end, instead of waiting in the next collective."""
        error = None
        try:
            yield
        except Exception as e:  # shared below, then raised again here
            error = e
        messages = self.gather(None if error is None else str(error) or type(error).__name__)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise StreamResizeError(f"rank {rank} failed {what}: {message}")


def fingerprint(tensors):
    """An integer that changes with any bit of any tensor in `tensors` (a dict), computed on the tensors'
    device: each tensor's bits as integers, weighted by odd position factors and summed in int64 (an
    integer sum is the same in any order; a single differing element always changes it). Not a
    cryptographic hash: it only has to tell whether ranks computed the same bytes."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().reshape(-1)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        t = t.view(ints[t.element_size()])
        acc = torch.zeros((), dtype=torch.int64, device=t.device)
        step = 1 << 22
        for start in range(0, t.numel(), step):
            part = t[start:start + step].to(torch.int64)
            weight = torch.arange(start, start + part.numel(), dtype=torch.int64, device=t.device) % 65521 * 2 + 1
            acc += (part * weight).sum()
        tag = int.from_bytes(hashlib.blake2b(f"{name}{tuple(tensors[name].shape)}{tensors[name].dtype}".encode(),
                                             digest_size=7).digest(), "little")
        total = (total * 1000003 + int(acc) + tag) % (1 << 61)
    return total


# ---- a rank's own progress marker -------------------------------------------------------------------

def read_progress(work_dir):
    path = os.path.join(work_dir, PROGRESS)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # torn by a kill: treated as missing (it is written atomically, so this is never expected)


def write_progress(work_dir, state):
    from .writer import atomic_write_json

    atomic_write_json(os.path.join(work_dir, PROGRESS), state)


def signature_digest(signature):
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
