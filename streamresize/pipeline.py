"""The streaming loop, the same for every method and every model family.

    claim the directories -> plan -> (resume) -> method.prepare -> embedding step -> one step per
    block -> head step -> config, tokenizer, index (the completion marker) -> clean-up

Only one block's weights, one micro-batch of hidden states and the current statistics are ever in
memory; the hidden states of all calibration sequences live in the activation cache (`cache.py`), and
every finished step is recorded in a manifest so a crashed run resumes where it stopped. The method
(`methods/`) decides what each step computes; this module decides when and where things are read,
written and committed, and names no method and no family.
"""

import hashlib
import logging
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from .arch import spec_for
from .cache import ActivationCache
from .calibration import calibration_ids
from .checkpoint import CheckpointReader, parameter_count
from .commit import BackgroundCommit
from .distributed import fingerprint, from_env, rank_dir_name, read_progress, signature_digest, write_progress
from .errors import StreamResizeError
from .formats import FORMATS, export, write_bundled_card
from .manifest import MANIFEST, Manifest
from .memory import MemoryMonitor
from .methods import registry
from .modeling.modeling_streamresize import MODEL_TYPE, family_classes
from .placement import MemoryOptions
from .plan import check_disk, make_plan
from .precision import exact_float32_matmuls, resolve_compute_dtype, resolve_statistics_products
from .statistics import products
from .prefetch import Prefetcher
from .runtime import crash_point, peak_memory_mb, resolve_device, set_step, stop_requested  # noqa: F401  (resolve_device: for the CLI)
from .version import __version__
from .workspace import BUNDLED_DIR, DirectoryLock, WorkDir, check_layout
from .writer import RUN_LOG, OutputDir, ShardWriter, atomic_write_json, count_non_finite

log = logging.getLogger("streamresize")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config keys of the source that an output never inherits.
NOT_INHERITED = ("architectures", "model_type", "auto_map", "transformers_version", "torch_dtype")


def default_work_dir(out_dir):
    return os.path.abspath(out_dir).rstrip(os.sep) + ".streamresize-work"


class Run:
    """One compression: the source checkpoint, the directories, the method, and the streaming state."""

    def __init__(self, model_dir, out_dir, recipe, work_dir=None, restart=False, memory=None, overwrite=False,
                 save_format="auto", dist=None):
        self.model_dir = os.path.abspath(model_dir)
        self.out_dir = os.path.abspath(out_dir)
        self.work_dir = self.work_root = os.path.abspath(work_dir or default_work_dir(out_dir))
        # A data-parallel run (distributed.Dist, from torchrun's environment): this process's rank owns a
        # share of the calibration sequences; None in a single process. Rank 0 keeps its files where a
        # single process does; rank r its cache and resume files in WORK/rank-0000r.
        self.dist = dist
        self.is_writer = dist is None or dist.is_writer
        if dist is not None and dist.rank > 0:
            self.work_dir = os.path.join(self.work_root, rank_dir_name(dist.rank))
        self.recipe = recipe
        self.restart = restart
        self.overwrite = overwrite
        if save_format not in FORMATS:
            raise StreamResizeError(f"--save-format {save_format}: choose from {', '.join(FORMATS)}")
        self.save_format = save_format
        self.memory = memory or MemoryOptions()  # budgets, cache location, prefetch: not in the recipe
        self.all_reduce = dist.all_reduce if dist is not None and dist.initialized else None  # in-place sum
        self._agreed_stop = None  # a data-parallel run: the stop request every rank agreed on at the last step
        check_layout(self.model_dir, self.out_dir, self.work_root)
        self.reader = CheckpointReader(self.model_dir)
        config_path = os.path.join(self.model_dir, "config.json")
        self.family = spec_for(self.reader.config, config_path)
        self.family.check(self.reader.config, self.reader.weight_map, config_path)
        problem = self.family.method_problem(recipe.method)
        if problem:
            raise StreamResizeError(f"{config_path}: {problem}")
        self.source_config = dict(self.reader.config)
        self.source_config.pop("quantization_config", None)
        c = self.source_config
        self.hidden = c["hidden_size"]
        self.num_layers = c["num_hidden_layers"]
        self.source_config.setdefault("head_dim", self.hidden // c["num_attention_heads"])
        self.shape = self.family.shape(self.source_config)
        self.device = resolve_device(recipe.device)
        if dist is not None:
            self.device = dist.device(self.device)  # cuda:LOCAL_RANK
            if recipe.num_calibration_samples < dist.world:
                raise StreamResizeError(f"--num-calibration-samples {recipe.num_calibration_samples}: fewer sequences "
                                        f"than the {dist.world} processes that share them; give at least {dist.world}")
            if recipe.allocation == "learned":
                raise StreamResizeError("--allocation learned trains on the whole model in one process; it cannot "
                                        "run under torchrun (use --allocation global, or a single process)")
        self.compute_dtype = resolve_compute_dtype(recipe.compute_dtype, self.device)
        self.statistics_products = resolve_statistics_products(recipe.statistics_products, self.device)
        self.out_dtype = self.reader.dtype if recipe.dtype == "auto" else DTYPES[recipe.dtype]
        self.method = registry.build(recipe.method, self)
        if self.method.fixed_compute_dtype is not None:
            self.compute_dtype = self.method.fixed_compute_dtype
        if save_format in FORMATS[1:] and save_format not in self.family.formats:
            raise StreamResizeError(f"{self.out_dir}: --save-format {save_format}: a {self.family.name} model cannot "
                                    f"be written in this format ({self.family.formats_why}); use "
                                    f"{' or '.join(('auto', *self.family.formats))}")
        problem = self.method.stock_problem() if save_format in ("stock", "decilm") else None
        if problem:  # known from the widths alone: refuse before any work
            kind = "a stock checkpoint" if save_format == "stock" else "DeciLM"
            raise StreamResizeError(f"{self.out_dir}: cannot be written as {kind}: {problem}; "
                                    "use --save-format auto or bundled")

    # ---- set-up -----------------------------------------------------------------------------

    def _claim(self):
        """`_claim_output`, then where the shards go: straight into the output for the bundled format,
        else into a bundled copy in the work dir that `formats.export` writes out at the end. In a
        data-parallel run rank 0 claims the output and the work dir first, then every other rank its
        own folder in it."""
        if self.dist is not None:
            return self._claim_distributed()
        done = self._claim_output()
        self.publish_dir = self.out_dir
        if done is None and self.save_format != "bundled":
            self.out_dir = self.work_path(BUNDLED_DIR)
            os.makedirs(self.out_dir, exist_ok=True)
        return done

    def _claim_distributed(self):
        dist = self.dist
        done = None
        with dist.guard("claiming the output and the work dir"):
            if dist.is_writer:
                done = self._claim_output()
                self.publish_dir = self.out_dir
                if done is None and self.save_format != "bundled":
                    self.out_dir = self.work_path(BUNDLED_DIR)
                    os.makedirs(self.out_dir, exist_ok=True)
        done = dist.broadcast(done)
        if done is not None:
            return done
        with dist.guard("claiming its work dir"):
            if not dist.is_writer:
                self._claim_rank()
        with dist.guard("reading the calibration text"):
            dist.agree("the calibration token ids", int(self.ids_sha256[:15], 16))
        return None

    def _claim_rank(self):
        """Rank r > 0: its own folder in the work dir (node-local scratch, or beside rank 0's files), the
        same calibration ids as rank 0 (tokenized here too), the same signature."""
        if not self.recipe.dataset:
            raise StreamResizeError("no calibration text: pass --dataset FILE (.txt or .jsonl) or --dataset random")
        self.final_out_dir = self.publish_dir = self.out_dir
        self.plan = make_plan(self)
        check_disk(self.plan)
        self.workspace = WorkDir(self.work_dir, self.out_dir).claim()
        self._read_calibration()
        if self.restart:
            self.workspace.clear()

    def _read_calibration(self):
        r = self.recipe
        ids = calibration_ids(self.model_dir, r.dataset, r.num_calibration_samples, r.max_seq_length, r.seed)
        self.all_ids = ids
        self.ids_sha256 = hashlib.sha256(ids.tobytes()).hexdigest()
        if self.dist is not None:  # this rank's fixed share of the sequences
            start, end = self.dist.rows(ids.shape[0])
            ids = ids[start:end]
        self.ids = ids  # what the methods calibrate on: this process's sequences
        self.signature = {
            "model": self.reader.signature(),
            "calibration_ids": self.ids_sha256,
            "recipe": r.digest(),
            "version": __version__,
            "save_format": self.save_format,
        }

    def _claim_output(self):
        """Lock the output and the work dir, then decide where this run writes: a new or resumable
        output in place, an output to be replaced (written beside it, swapped in when complete), or
        nothing at all when the output is already this run's finished result. Returns that result's
        summary in the last case, else None."""
        if not self.recipe.dataset:
            raise StreamResizeError("no calibration text: pass --dataset FILE (.txt or .jsonl) or --dataset random")
        self.final_out_dir = self.out_dir
        self.plan = make_plan(self)  # memory placement and disk needs, from shapes alone: before any
        check_disk(self.plan)  # directory is made, so a refused run leaves nothing behind
        output = OutputDir(self.out_dir)
        output.finish_interrupted_swap()
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise StreamResizeError(f"{self.out_dir}: cannot create the output directory ({e.strerror})") from e
        self.out_lock = DirectoryLock(self.out_dir, "output directory").acquire()
        self.workspace = WorkDir(self.work_dir, self.out_dir).claim()
        # Only now: a run refused by the lock has not started, and must not log that it has.
        log.info("compressing %s -> %s with %s", self.model_dir, self.out_dir, self.recipe.resolved())
        self._read_calibration()
        if self.restart:
            self.workspace.clear()
        resumable = os.path.exists(os.path.join(self.work_dir, MANIFEST))
        finished = output.finished_signature()
        if finished is not None and finished == self.signature and not self.restart:
            log.info("%s: already holds the finished output of this run; nothing to do", self.out_dir)
            self.workspace.remove()
            return {"output": self.out_dir, "parameters": parameter_count(self.out_dir), "already_complete": True}
        if resumable and os.path.isdir(output.staging_path):
            self.out_dir = output.staging_path  # an unfinished replacement continues where it was written
            return None
        foreign = output.foreign_files() if not resumable else []
        if foreign:
            if not (self.overwrite or (self.restart and finished is not None)):
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                what = ("a finished checkpoint of a different run" if finished is not None
                        else f"files streamresize did not write ({shown})")
                raise StreamResizeError(
                    f"{self.out_dir}: already holds {what}; choose another output, or pass --overwrite "
                    "(--restart for a streamresize output) to replace it once the new output is complete")
            self.out_dir = output.staging_path
            if os.path.isdir(self.out_dir):
                shutil.rmtree(self.out_dir)  # a replacement nobody can resume: ours, by its name
            os.makedirs(self.out_dir)
            log.info("%s will be replaced once the new output in %s is complete", self.final_out_dir, self.out_dir)
        return None

    def _prepare(self):
        if self.dist is None:
            np.save(os.path.join(self.work_dir, "calibration_ids.npy"), self.ids)
            self.manifest = Manifest.open(self.work_dir, self.signature, self.restart)
        else:
            self._open_manifest_distributed()
        placement = self.plan.placement
        log.info("placement: micro-batch %d sequences, activation cache on %s, prefetch %s, compute %s",
                 placement.batch_size, placement.cache, placement.prefetch,
                 str(self.compute_dtype).replace("torch.", ""))
        self.cache = ActivationCache(self.work_dir, self.ids.shape[0], self.ids.shape[1], self.hidden,
                                     placement.cache, self.device, placement.batch_size)
        for name in self.method.cache_files:
            self.cache.add_file(name)
        for name in self.paired("hidden_a") + self.paired("hidden_b"):
            self.cache.add_file(name, resumable=True)
        current = self.manifest.state["current_cache"]
        if current:
            for name in [current, *self.paired(current)]:
                self.cache.restore(name)
        self.prefetcher = Prefetcher(self.model_dir, self._group_names, keep=placement.prefetch == "memory",
                                     pin=self.device.type == "cuda", enabled=placement.prefetch != "off")
        if self.device.type == "cuda":
            exact_float32_matmuls()
        if self.dist is not None:
            with self.dist.guard("checking the output's shards"):
                self._open_writer()
        else:
            self._open_writer()
        from .modeling.modeling_streamresize import StreamResizeConfig

        self.block_config = StreamResizeConfig(**self.model_config_fields())
        self.block_config._attn_implementation = self.family.attention_implementation
        rotary_cls = family_classes(self.family.name)[2]
        self.rotary = rotary_cls(config=self.block_config).to(self.device)

    def _open_writer(self):
        self.writer = None
        if not self.is_writer:
            return
        self.writer = ShardWriter(self.out_dir, self.out_dtype)
        self.writer.clear_completion_marker()
        self.writer.remove_temp_files()
        for name, sha in self.manifest.state["shards"].items():
            if not self.writer.shard_ok(name, sha):
                raise StreamResizeError(
                    f"{os.path.join(self.out_dir, name)}: changed or missing since this run wrote it; "
                    "rerun with --restart")

    def _open_manifest_distributed(self):
        """Rank 0 opens the manifest (refusing another world size) and hands its state to every rank;
        each rank then checks that its own folder holds the cache of the manifest's step."""
        dist = self.dist
        with dist.guard("opening the manifest"):
            if dist.is_writer:
                np.save(os.path.join(self.work_dir, "calibration_ids.npy"), self.all_ids)
                self.manifest = Manifest.open(self.work_dir, self.signature, self.restart, dist.world)
        state = dist.broadcast(self.manifest.state if dist.is_writer else None)
        if not dist.is_writer:
            self.manifest = Manifest(self.work_dir, self.signature, dist.world)
            self.manifest.state = state  # kept in memory only: rank 0's file is the commit point
        self._signature_digest = signature_digest(self.signature)
        with dist.guard("checking its saved state"):
            first = self.manifest.next_block
            progress = read_progress(self.work_dir)
            if first > -1:
                ok = (progress is not None and progress.get("signature") == self._signature_digest
                      and progress.get("world_size") == dist.world and progress.get("rank") == dist.rank
                      and progress.get("next_block") in (first, first + 1))
                if not ok:
                    held = ("nothing" if progress is None else f"the state of step {progress.get('next_block')} "
                            f"of rank {progress.get('rank')} of {progress.get('world_size')}")
                    raise StreamResizeError(
                        f"{self.work_dir}: rank {dist.rank} needs its saved activation cache for block {first}, "
                        f"but its work dir holds {held} (node-local scratch on another node, or removed?); run "
                        "each rank on the node that holds its work dir, or rerun with --restart to start over")

    def model_config_fields(self, **fields):
        """The source's config without what an output never inherits, plus `fields`."""
        c = {k: v for k, v in self.source_config.items() if k not in NOT_INHERITED}
        c.update(base_model_type=self.family.name, **fields)
        if self.family.biases:  # biases the family's config does not declare: our modeling code reads them here
            c["linear_biases"] = list(self.family.biases)
        if self.family.fused:  # fused tensors the family's modules compute from our separate parts
            c["fused_linears"] = [[name, list(parts)] for name, parts in self.family.fused]
        if not self.family.norms_folded:  # norms keep their weights: the family's own norm class, by name
            post_attn, post_mlp = self.family.post_norms or (None, None)
            c["block_norms"] = [self.family.attn_norm, post_attn, self.family.mlp_norm, post_mlp]
        if self.family.embedding_scale:
            c["embedding_scale"] = self.hidden ** 0.5
        return c

    # ---- services for the methods --------------------------------------------------------------

    def weight(self, name):
        """A checkpoint tensor as float32 on the device; NaN or Inf in it is refused, naming it."""
        tensor = self.prefetcher.get(name, torch.float32, self.device)
        bad = count_non_finite(tensor)
        if bad:
            raise StreamResizeError(f"{self.reader.location(name)[0]}: tensor '{name}' holds {bad} non-finite "
                                    "value(s) (NaN or Inf); streamresize needs finite weights")
        return tensor

    def block_weight(self, layer, role):
        """Role `role`'s weight in block `layer`; a part of a fused tensor (the family's `fused`) is its rows."""
        self.prefetcher.schedule(layer + 1)  # the next block reads from disk while this one computes
        stored, parts = self.family.stored_role(role)
        weight = self.weight(self.family.block_name(layer, stored) + ".weight")
        if parts is None:
            return weight
        start, end = self.family.part_rows(role, self.source_config)
        return weight[start:end]

    def block_extras(self, layer):
        """Block `layer`'s tensors besides the roles' weights (reader biases, per-head norms), by their name
        inside the block, float32 on the device; every method carries them to the output."""
        return {name: self.weight(self.family.block.format(i=layer) + name) for name in self.family.extra_tensors}

    def _group_names(self, layer):
        """Tensors read for block `layer`; past the last block, those of the head step."""
        if layer < self.num_layers:
            prefix = self.family.block.format(i=layer)
            return sorted(n for n in self.reader.weight_map if n.startswith(prefix))
        if layer == self.num_layers:
            head = self.family.head if self.reader.has(self.family.head) else self.family.embedding
            return [self.family.final_norm] + ([head] if not self.method.tied_head else [])
        return []

    def as_output(self, tensors):
        """Float64 transforms cast to the output dtype once nothing else reads them: the same bytes
        the shard gets, at a quarter of the memory for a bf16 output."""
        return {name: w.to(self.out_dtype) for name, w in tensors.items()}

    def set_weights(self, layer, weights):
        """Set a layer's tensors: a role ("self_attn.q_proj") sets its weight; a name ending in .weight or
        .bias (`block_extras`) sets that tensor."""
        for role, w in weights.items():
            module, _, kind = role.rpartition(".")
            if kind not in ("weight", "bias"):
                module, kind = role, "weight"
            setattr(layer.get_submodule(module), kind,
                    torch.nn.Parameter(w.to(self.compute_dtype), requires_grad=False))

    def reduce(self, moments):
        """Moments summed over every process of the run: the one collective on the math path. A
        single process (this version) has nothing to add, so it returns them unchanged."""
        return moments.reduce(self.all_reduce)

    def reduce_tensors(self, *sums):
        """Plain float64 sums (not Moments) summed over every process, like `reduce`."""
        if self.all_reduce is not None:
            for tensor in sums:
                self.all_reduce(tensor)
        return sums

    def reduce_count(self, count):
        """A token count summed over every process, like `reduce`."""
        if self.all_reduce is None:
            return count
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        self.all_reduce(total)
        return int(total.item())

    def paired(self, cache_name):
        """The files of the method's paired streams that go with `cache_name` (hidden_a -> dense_a)."""
        return [cache_name.replace("hidden", stream, 1) for stream in self.method.paired_streams]

    def work_path(self, name):
        return os.path.join(self.work_dir, name)

    def begin_block(self, i):
        """Start of block i: its clock, a fresh GPU peak, and the cache files it reads and writes
        (the two alternate, so the block's inputs survive until its outputs are committed)."""
        start = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        set_step(i)
        crash_point(i, "start")
        source = self.manifest.state["current_cache"]
        return start, source, "hidden_b" if source == "hidden_a" else "hidden_a"

    def commit_step(self, step, next_cache, next_width, shard_name, tensors, entry, save=None, obsolete=()):
        """Write the shard, then the method's resume files (`save()`), then the manifest (the commit
        point, in the background while the next block computes), then delete `obsolete` work files."""
        if self.dist is not None:
            return self._commit_step_distributed(step, next_cache, next_width, shard_name, tensors, entry, save,
                                                 obsolete)
        sha = self.writer.write_shard(shard_name, tensors)
        if save is not None:
            save()
        crash_point(step, "committing")
        self.committer.join()  # the previous step is committed before this one
        now = time.time()
        entry.update(self.monitor.step_peaks(), step_seconds=now - self._step_started,
                     read_wait_seconds=self.prefetcher.take_wait_seconds(),
                     commit_wait_seconds=self.committer.take_wait_seconds())
        self._step_started = now
        self.manifest.update(step + 1, next_cache, {shard_name: sha}, {k: shard_name for k in tensors}, entry)
        state = self.manifest.serialize()
        persist = [self.cache.persist_later(next_cache, next_width)]
        persist += [self.cache.persist_later(name, self.hidden) for name in self.paired(next_cache)]

        def commit():  # in the background, while the next block computes
            for write in persist:  # an in-memory cache's files: the resume state
                write()
            self.manifest.save(state)
            for path in obsolete:
                if os.path.exists(path):
                    os.remove(path)

        self.committer.start(commit)

    def _commit_step_distributed(self, step, next_cache, next_width, shard_name, tensors, entry, save, obsolete):
        """`commit_step` of a data-parallel run, in two collectives (see distributed.py): (B) every rank's
        cache and progress marker for the next step are durable, the step's tensors are the same on every
        rank, and a stop request on any rank is shared; rank 0 then saves the manifest; (D) it is durable,
        and only now may any rank overwrite this step's inputs (the next step's output file) or remove
        `obsolete` files. Synchronous: the cache is persisted before the next step starts."""
        dist = self.dist
        digest = fingerprint(tensors)
        sha = self.writer.write_shard(shard_name, tensors) if self.is_writer else None
        if save is not None:
            save()  # every rank: its own copy of the method's resume files
        crash_point(step, "committing")
        self.committer.join()
        self.cache.persist_later(next_cache, next_width)()
        for name in self.paired(next_cache):
            self.cache.persist_later(name, self.hidden)()
        write_progress(self.work_dir, {"next_block": step + 1, "cache": next_cache, "rank": dist.rank,
                                       "world_size": dist.world, "signature": self._signature_digest})
        crash_point(step, "persisted")
        signal_number = getattr(signal, stop_requested() or "", 0) if stop_requested() else 0
        stop = dist.agree(f"the tensors of step {step}", digest, int(signal_number))
        self._agreed_stop = signal.Signals(stop).name if stop else None
        now = time.time()
        seconds, nbytes, calls = dist.take_counters()
        entry.update(self.monitor.step_peaks(), step_seconds=now - self._step_started,
                     read_wait_seconds=self.prefetcher.take_wait_seconds(),
                     commit_wait_seconds=self.committer.take_wait_seconds(),
                     collective_seconds=seconds, reduced_bytes=nbytes, collectives=calls)
        self._step_started = now
        self.manifest.update(step + 1, next_cache, {shard_name: sha} if sha else {},
                             {k: shard_name for k in tensors}, entry)
        if self.is_writer:
            self.manifest.save(self.manifest.serialize())
        crash_point(step, "manifest")
        dist.barrier()
        for path in obsolete:
            if os.path.exists(path):
                os.remove(path)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self):
        start = self._step_started = time.time()
        self.monitor = MemoryMonitor().start()
        self.committer = BackgroundCommit()
        try:
            with products(self.statistics_products):
                return self._run(start)
        except torch.cuda.OutOfMemoryError as e:
            raise StreamResizeError(self._out_of_memory_message(e)) from e
        finally:
            self.committer.join(raise_errors=False)  # a commit in flight completes: its state is consistent
            if getattr(self, "prefetcher", None) is not None:
                self.prefetcher.close()
            self.monitor.stop()
            for held in (getattr(self, "workspace", None), getattr(self, "out_lock", None)):
                if held is not None:
                    held.release()

    def _out_of_memory_message(self, error):
        step = self.manifest.next_block if getattr(self, "manifest", None) else None
        where = f"at block {step}" if step is not None and step >= 0 else "before the first block"
        placement = self.plan.placement if getattr(self, "plan", None) else None
        planned = (f"; the plan used a micro-batch of {placement.batch_size} sequences with the activation cache "
                   f"on {placement.cache}") if placement else ""
        if self.device.type == "cuda":
            return (f"{self.device}: out of memory {where}{planned}. Lower --max-gpu-memory (now "
                    f"{self.memory.describe('gpu')}) so the planner picks a smaller micro-batch and moves the "
                    f"cache off the GPU, or lower --batch-size; the run resumes where it stopped. ({error})")
        return (f"out of CPU memory {where}{planned}. Lower --max-cpu-memory (now {self.memory.describe('cpu')}) "
                f"or --batch-size; the run resumes where it stopped. ({error})")

    def _run(self, start):
        from .runtime import Preempted, stop_requested

        def stop_if_requested(step):
            """A signal asked the run to stop: let the commit in flight land, then stop, resumable. In a
            data-parallel run, every rank stops at the boundary where any rank's request was shared."""
            name = stop_requested() if self.dist is None else self._agreed_stop
            if name is not None:
                self.committer.join()
                if self.dist is not None:
                    own = stop_requested()
                    progress = read_progress(self.work_dir) or {}
                    write_progress(self.work_dir, {**progress, "stopped_by": own or f"{name} on another rank"})
                    if own is None:
                        name = f"{name} (on another rank)"
                message = f"stopped by {name} after {step}; rerun the same command to resume"
                log.warning("%s", message)
                raise Preempted(message, name)

        set_step("claim")
        done = self._claim()
        if done is not None:
            return done
        self._prepare()
        first = self.manifest.next_block
        if first > -1:
            log.info("resuming at block %d of %d from %s", first, self.num_layers, self.work_dir)
        progress = tqdm(total=self.num_layers + 1, initial=first + 1, desc="compressing", unit="step",
                        disable=not sys.stderr.isatty() or not self.is_writer, file=sys.stderr)
        with progress:
            self.prefetcher.schedule(max(first, 0))
            set_step("prepare")
            self.method.prepare(first, progress)
            if first == -1:
                set_step(-1)
                self.method.embedding(progress)
                progress.update(1)
                stop_if_requested("the embedding step")
            for i in range(max(first, 0), self.num_layers):
                self.method.block(i, progress)
                progress.update(1)
                stop_if_requested(f"block {i + 1}/{self.num_layers}")  # numbered as the block's log line
            progress.set_postfix_str("writing head")
            self.committer.join()
            set_step("head")
            crash_point("head", "start")
            head = self.method.head()
            if self.dist is not None:
                self.dist.agree("the head's tensors", fingerprint(head))
                return self._finish_distributed(head, start)
            sha = self.writer.write_shard("model-head.safetensors", head)
        return self._publish(head, sha, start)

    def _finish_distributed(self, head, start):
        """Rank 0 writes the config, card and index and publishes the output while the others wait; then
        every other rank removes its folder, and rank 0 the work dir."""
        dist = self.dist
        summary = None
        with dist.guard("writing the output"):
            if self.is_writer:
                sha = self.writer.write_shard("model-head.safetensors", head)
                summary = self._publish(head, sha, start, cleanup=False)
        summary = dist.broadcast(summary)
        self.reader.close()
        set_step("cleanup")
        if not self.is_writer:
            self.workspace.remove()
            try:
                os.rmdir(self.work_root)  # node-local scratch of this rank only: leave nothing behind
            except OSError:
                pass
        dist.barrier()
        if self.is_writer:
            self.workspace.remove()
        return summary

    def _publish(self, head, sha, start, cleanup=True):
        weight_map = dict(self.manifest.state["weight_map"])
        weight_map.update({k: "model-head.safetensors" for k in head})
        set_step("finish")
        summary = self._finish(weight_map, {**self.manifest.state["shards"], "model-head.safetensors": sha},
                               time.time() - start)
        if cleanup:
            self.reader.close()
        if self.publish_dir != self.out_dir:
            exported = time.time()
            summary["format"] = export(self.out_dir, self.publish_dir, self.save_format, link=True,
                                       name=self.final_out_dir)
            summary["parameters"] = parameter_count(self.publish_dir)
            summary["parameter_ratio"] = summary["parameters"] / summary["source_parameters"]
            # Rewriting as a stock checkpoint is part of the user's wait (30 s of a 7B run on a GPU).
            summary["seconds"] = time.time() - start
            log.info("written as %s to %s in %.1fs (%.1fs in all)", summary["format"], self.publish_dir,
                     time.time() - exported, summary["seconds"])
        else:
            summary["format"] = "bundled"
        if self.publish_dir != self.final_out_dir:
            OutputDir(self.final_out_dir).swap_in(self.publish_dir)
        self.out_dir = summary["output"] = self.final_out_dir
        if cleanup:
            set_step("cleanup")
            self.workspace.remove()
        return summary

    def _finish(self, weight_map, shards, seconds):
        total_bytes = sum(os.path.getsize(os.path.join(self.out_dir, s)) for s in shards)
        config = self.method.output_config(self.model_config_fields(), weight_map)
        config.update(architectures=["StreamResizeForCausalLM"], model_type=MODEL_TYPE,
                      dtype=str(self.out_dtype).replace("torch.", ""),
                      auto_map={"AutoConfig": "modeling_streamresize.StreamResizeConfig",
                                "AutoModelForCausalLM": "modeling_streamresize.StreamResizeForCausalLM"})
        steps = self.manifest.state["log"]
        source_params = self.reader.parameter_count()
        # config.json holds only what the computation decided, so a resumed run writes it byte for byte
        # the same; timings and memory go to RUN_LOG.
        config["streamresize"] = {
            "version": __version__, "method": self.recipe.method, "method_options": self.method.options,
            "recipe": self.recipe.resolved(), "calibration_ids_sha256": self.ids_sha256,
            "source_parameters": source_params, "points": [p for step in steps for p in step["points"]],
            **self.method.record(steps),
        }
        rss, gpu = peak_memory_mb(self.device)
        run_log = {"source": self.model_dir, "signature": self.signature, "seconds": seconds,
                   "peak_rss_mb": rss, "peak_gpu_mb": gpu, "device": str(self.device),
                   **self.monitor.run_peaks(), "placement": self.plan.placement.as_dict(),
                   "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                   "statistics_products": str(self.statistics_products).replace("torch.", ""),
                   "steps": [{k: v for k, v in step.items() if k != "points"} for step in steps]}
        atomic_write_json(os.path.join(self.out_dir, RUN_LOG), run_log)
        card = (lambda: write_bundled_card(self.out_dir, config, weight_map)) if self.publish_dir == self.out_dir else None
        self.writer.finish(self.model_dir, config, weight_map, total_bytes, before_index=card)
        params = parameter_count(self.out_dir)
        summary = {"output": self.out_dir, "parameters": params, "source_parameters": source_params,
                   "parameter_ratio": params / source_params, "seconds": seconds, "peak_rss_mb": rss}
        log.info("done: %d parameters (%.1f%% of %d) in %.1fs", params, 100 * params / source_params,
                 source_params, seconds)
        return summary


def compress(model_dir, out_dir, recipe, work_dir=None, restart=False, memory=None, overwrite=False,
             save_format="auto", dist="env"):
    """One compression. Under torchrun / accelerate launch (WORLD_SIZE set) this process is one rank of a
    data-parallel run (`distributed.py`); `dist=None` forces a single process."""
    if dist == "env":
        dist = from_env()
    try:
        if dist is not None:
            dist.init(dist.device(resolve_device(recipe.device)))
        return Run(model_dir, out_dir, recipe, work_dir, restart, memory, overwrite, save_format, dist).run()
    finally:
        if dist is not None:
            dist.close()
