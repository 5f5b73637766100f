"""The streaming compression loop.

    embedding point -> for each block: load -> calibrate -> statistics -> solve -> transform
    -> write -> propagate -> head -> index

Only one block's weights, one micro-batch of hidden states and the current
point's statistics are ever in memory; the hidden states of all calibration
sequences live in memory-mapped files (`cache.py`), and every finished step is
recorded in a manifest so a crashed run resumes where it stopped.
"""

import hashlib
import logging
import os
import resource
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from . import __version__
from .architectures import check_supported, family_for
from .budget import widths_for_target
from .cache import ActivationCache
from .calibration import calibration_ids
from .checkpoint import CheckpointReader
from .commit import BackgroundCommit
from .errors import StreamResizeError
from .manifest import MANIFEST, Manifest
from .memory import MemoryMonitor
from .methods import method_defaults, solver, target_width
from .modeling.modeling_streamresize import (
    MODEL_TYPE,
    StreamResizeConfig,
    StreamResizeDecoderLayer,
    attention_inputs,
    family_classes,
)
from .placement import MemoryOptions
from .plan import check_disk, make_plan
from .precision import compute_in, exact_float32_matmuls, resolve_compute_dtype
from .prefetch import Prefetcher
from .statistics import PointStatistics, pca_error, relative_error
from .methods.dotresize import DEFAULTS as DOTRESIZE_DEFAULTS
from .methods.neurons import narrow_mlp
from .transforms import by_rows, fold_norm, rotate_embedding, rotate_reader, rotate_writer, shortcut
from .workspace import DirectoryLock, WorkDir, check_layout
from .writer import RUN_LOG, OutputDir, ShardWriter, atomic_write_json, save_tensors


log = logging.getLogger("streamresize")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def default_work_dir(out_dir):
    return os.path.abspath(out_dir).rstrip(os.sep) + ".streamresize-work"


class StreamingCompressor:
    """Rotate-and-slice methods (pca, prune, dotresize): a basis at every point of the residual stream."""

    known_options = set(DOTRESIZE_DEFAULTS) | {"reader", "mlp_reader", "rotate_full_width"}

    def __init__(self, model_dir, out_dir, recipe, work_dir=None, restart=False, memory=None, overwrite=False):
        self.model_dir = os.path.abspath(model_dir)
        self.out_dir = os.path.abspath(out_dir)
        self.work_dir = os.path.abspath(work_dir or default_work_dir(out_dir))
        self.recipe = recipe
        self.restart = restart
        self.memory = memory or MemoryOptions()  # budgets, cache location, prefetch: not in the recipe
        self.overwrite = overwrite
        check_layout(self.model_dir, self.out_dir, self.work_dir)
        self.reader = CheckpointReader(self.model_dir)
        config_path = os.path.join(self.model_dir, "config.json")
        self.family = family_for(self.reader.config, config_path)
        check_supported(self.reader.config, config_path)
        self.source_config = dict(self.reader.config)
        self.source_config.pop("quantization_config", None)
        c = self.source_config
        self.hidden = c["hidden_size"]
        self.num_layers = c["num_hidden_layers"]
        self.source_config.setdefault("head_dim", self.hidden // c["num_attention_heads"])
        self.device = resolve_device(recipe.device)
        self.compute_dtype = resolve_compute_dtype(recipe.compute_dtype, self.device)
        self.solve = solver(recipe.method)
        self.out_dtype = self.reader.dtype if recipe.dtype == "auto" else DTYPES[recipe.dtype]
        self.mlp_method = recipe.mlp_method if recipe.mlp_method != "auto" else (
            "dotresize" if recipe.method == "dotresize" else "prune")
        unknown = sorted(set(recipe.method_options) - self.known_options)
        if unknown:
            raise StreamResizeError(f"unknown method option(s) {', '.join(unknown)} for {recipe.method}; known: "
                                    f"{', '.join(sorted(self.known_options))}")
        self.options = {**method_defaults(recipe.method), **recipe.method_options}
        self.reader_kind = self.options.get("reader", "pinv")
        if self.reader_kind not in ("pinv", "lstsq"):
            raise StreamResizeError(f"method option reader={self.reader_kind}: choose pinv or lstsq")
        source_tied = bool(c.get("tie_word_embeddings", False)) or not self.reader.has(self.family.head)
        head = recipe.head if recipe.head != "auto" else ("untied" if recipe.method == "pca" else "tied")
        if head not in ("tied", "untied"):
            raise StreamResizeError(f"--head {recipe.head}: choose auto, tied or untied")
        self.tied_head = head == "tied" and source_tied
        if recipe.basis not in ("per-point", "shared"):
            raise StreamResizeError(f"--basis {recipe.basis}: choose per-point or shared")
        self.shared_basis = None
        self._choose_widths()

    def _choose_widths(self):
        """Uniform widths from --sparsity / --mlp-sparsity, or from --target-size (the parameter budget)."""
        r, c = self.recipe, self.source_config
        if r.target_size is None:
            width = target_width(self.hidden, r.sparsity, r.width_multiple)
            intermediate = target_width(c["intermediate_size"], r.mlp_sparsity, r.width_multiple)
        else:
            width, intermediate = widths_for_target(
                c, r.target_size, self.reader.parameter_count(), r.mlp_ratio, r.width_multiple,
                r.basis == "per-point" and r.sparsity > 0, self.tied_head,
                residual_width=target_width(self.hidden, r.sparsity, r.width_multiple))
            log.info("target size %.3f: residual width %d of %d, MLP width %d of %d", r.target_size, width,
                     self.hidden, intermediate, c["intermediate_size"])
        self.widths = [width] * (2 * self.num_layers + 1)
        self.intermediate_sizes = [intermediate] * self.num_layers

    # ---- set-up -----------------------------------------------------------------------------

    def _claim(self):
        """Lock the output and the work dir, then decide where this run writes: a new or resumable
        output in place, an output to be replaced (written beside it, swapped in when complete), or
        nothing at all when the output is already this run's finished result. Returns that result's
        summary in the last case, else None."""
        if not self.recipe.dataset:
            raise StreamResizeError("no calibration text: pass --dataset FILE (.txt or .jsonl) or --dataset random")
        self.final_out_dir = self.out_dir
        output = OutputDir(self.out_dir)
        output.finish_interrupted_swap()
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise StreamResizeError(f"{self.out_dir}: cannot create the output directory ({e.strerror})") from e
        self.out_lock = DirectoryLock(self.out_dir, "output directory").acquire()
        self.workspace = WorkDir(self.work_dir, self.out_dir).claim()
        self.plan = make_plan(self)  # memory placement and disk needs, from shapes alone
        check_disk(self.plan)
        r = self.recipe
        ids = calibration_ids(self.model_dir, r.dataset, r.num_calibration_samples, r.max_seq_length, r.seed)
        self.ids = ids
        self.ids_sha256 = hashlib.sha256(ids.tobytes()).hexdigest()
        self.signature = {
            "model": self.reader.signature(),
            "calibration_ids": self.ids_sha256,
            "recipe": r.digest(),
            "version": __version__,
        }
        if self.restart:
            self.workspace.clear()
        resumable = os.path.exists(os.path.join(self.work_dir, MANIFEST))
        finished = output.finished_signature()
        if finished is not None and finished == self.signature and not self.restart:
            log.info("%s: already holds the finished output of this run; nothing to do", self.out_dir)
            self.workspace.remove()
            from .checkpoint import parameter_count

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
        np.save(os.path.join(self.work_dir, "calibration_ids.npy"), self.ids)
        self.manifest = Manifest.open(self.work_dir, self.signature, self.restart)
        placement = self.plan.placement
        log.info("placement: micro-batch %d sequences, activation cache on %s, prefetch %s, compute %s",
                 placement.batch_size, placement.cache, placement.prefetch,
                 str(self.compute_dtype).replace("torch.", ""))
        self.cache = ActivationCache(self.work_dir, self.ids.shape[0], self.ids.shape[1], self.hidden, placement.cache,
                                     self.device, placement.batch_size)
        if self.manifest.state["current_cache"]:
            self.cache.restore(self.manifest.state["current_cache"])
        self.prefetcher = Prefetcher(self.model_dir, self._group_names, keep=placement.prefetch == "memory",
                                     pin=self.device.type == "cuda", enabled=placement.prefetch != "off")
        if self.device.type == "cuda":
            exact_float32_matmuls()
        self.writer = ShardWriter(self.out_dir, self.out_dtype)
        self.writer.clear_completion_marker()
        self.writer.remove_temp_files()
        for name, sha in self.manifest.state["shards"].items():
            if not self.writer.shard_ok(name, sha):
                raise StreamResizeError(
                    f"{os.path.join(self.out_dir, name)}: changed or missing since this run wrote it; "
                    "rerun with --restart")
        self.block_config = StreamResizeConfig(**self._model_config_fields(dense_writers=True))
        self.block_config._attn_implementation = "sdpa"
        rotary_cls = family_classes(self.family.name)[2]
        self.rotary = rotary_cls(config=self.block_config).to(self.device)

    def _model_config_fields(self, dense_writers=False):
        c = {k: v for k, v in self.source_config.items()
             if k not in ("architectures", "model_type", "auto_map", "transformers_version", "torch_dtype")}
        widths = list(self.widths)
        if dense_writers:  # inside the engine, writers stay full width until their point is solved
            widths = [self.hidden] * len(widths)
        c.update(base_model_type=self.family.name, residual_widths=widths,
                 intermediate_sizes=self.intermediate_sizes, shortcuts=None)
        return c

    # ---- helpers ------------------------------------------------------------------------------

    def _weight(self, name):
        tensor = self.prefetcher.get(name, torch.float32, self.device)
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise StreamResizeError(f"{self.reader.location(name)[0]}: tensor '{name}' holds {bad} non-finite "
                                    "value(s) (NaN or Inf); streamresize needs finite weights")
        return tensor

    def _block_weight(self, layer, role):
        self.prefetcher.schedule(layer + 1)  # the next block reads from disk while this one computes
        return self._weight(self.family.block_name(layer, role) + ".weight")

    def _group_names(self, layer):
        """Tensors read for block `layer`; past the last block, those of the head step."""
        if layer < self.num_layers:
            prefix = self.family.block.format(i=layer)
            return sorted(n for n in self.reader.weight_map if n.startswith(prefix))
        if layer == self.num_layers:
            head = self.family.head if self.reader.has(self.family.head) else self.family.embedding
            return [self.family.final_norm] + ([head] if not self.tied_head else [])
        return []

    def _calibration_layer(self, i, k_in, weights):
        """Block i built by the output's own layer code, reading k_in columns; its writers stay
        full width until their point is solved, and the MLP readers are set once they are known."""
        fields = self._model_config_fields(dense_writers=True)
        fields["residual_widths"][2 * i] = k_in
        config = StreamResizeConfig(**fields)
        config._attn_implementation = self.block_config._attn_implementation
        with torch.device("meta"):
            layer = StreamResizeDecoderLayer(config, i)
        self._set_weights(layer, weights)
        return compute_in(layer.requires_grad_(False).eval(), self.compute_dtype)

    def _as_output(self, tensors):
        """Float64 transforms cast to the output dtype once nothing else reads them: the same bytes
        the shard gets, at a quarter of the memory for a bf16 output."""
        return {name: w.to(self.out_dtype) for name, w in tensors.items()}

    def _set_weights(self, layer, weights):
        for role, w in weights.items():
            layer.get_submodule(role).weight = torch.nn.Parameter(w.to(self.compute_dtype), requires_grad=False)

    def _basis_path(self, step):
        return os.path.join(self.work_dir, f"basis-{step}.safetensors")

    def _save_basis(self, step, basis, reader):
        path = self._basis_path(step)
        tensors = {"basis": basis.cpu().contiguous()}
        if reader is not basis:
            tensors["reader"] = reader.cpu().contiguous()
        save_tensors(path, tensors)

    def _load_basis(self, step):
        """(basis, reader map) of the point a step ended on."""
        saved = load_file(self._basis_path(step))
        basis = saved["basis"].to(self.device)
        return basis, saved["reader"].to(self.device) if "reader" in saved else basis

    def _new_stats(self):
        return PointStatistics(self.hidden, self.device)

    def _solve_point(self, stats, point, signals):
        """Basis Q and reader map M of one point (M = Q unless readers are refitted), plus its log.
        `signals` names the cache file that holds the point's full-width signals."""
        width = self.widths[point]
        stats.offload(os.path.join(self.work_dir, f"stats-{point}.f64"))
        stats.to(self.device)
        if self.shared_basis is not None:
            basis, info = self.shared_basis, {"shared_basis": True}
        elif width == self.hidden and not self.options.get("rotate_full_width", False):
            # Nothing to remove: keep the neuron basis, so no skip-path matrices are needed.
            basis, info = torch.eye(width, dtype=torch.float64, device=self.device), {"identity": True}
        else:
            basis, info = self.solve(stats, width, self.options)
        reader = basis if self.reader_kind == "pinv" else self._refit_reader(signals, basis)
        info = {"point": point, "width": width, "local_error": relative_error(stats.gram, basis),
                "pca_error": pca_error(stats.gram, width), **info}
        stats.discard()
        return basis, reader, info

    def _refit_reader(self, signals, basis):
        """Readers refitted by least squares on the inputs they will actually see:
        min ‖n(X) Wᵀ − n(X Q) W'ᵀ‖ with n the RMSNorm over the original width (so the narrowed
        input's smaller norm is accounted for). Returns M (d x k) with W' = W M; for PCA, M ≈ Q."""
        view = self.cache.view(signals, self.hidden)
        width, eps = basis.shape[1], self.source_config.get("rms_norm_eps", 1e-6)
        inner = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        cross = torch.zeros(width, self.hidden, dtype=torch.float64, device=self.device)
        for rows in self.cache.batches(self.recipe.batch_size):
            x = self.cache.read(view, rows, self.device).reshape(-1, self.hidden).double()
            z = x @ basis
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            nz = z * torch.rsqrt(z.pow(2).sum(-1, keepdim=True) / self.hidden + eps)
            inner += nz.T @ nz
            cross += nz.T @ n
        inner += 1e-8 * inner.diagonal().mean().clamp_min(1e-30) * torch.eye(width, dtype=inner.dtype,
                                                                             device=inner.device)
        return torch.linalg.solve(inner, cross).T.contiguous()

    def _finish_step(self, step, next_cache, shard_name, tensors, basis, reader, entry):
        """Write the shard, then the basis, then the manifest (the commit point), then tidy up."""
        sha = self.writer.write_shard(shard_name, tensors)
        if basis is not None:
            self._save_basis(step, basis, reader)
        crash_point(step, "committing")
        self.committer.join()  # the previous step is committed before this one
        now = time.time()
        entry.update(self.monitor.step_peaks(), step_seconds=now - self._step_started,
                     read_wait_seconds=self.prefetcher.take_wait_seconds(),
                     commit_wait_seconds=self.committer.take_wait_seconds())
        self._step_started = now
        self.manifest.update(step + 1, next_cache, {shard_name: sha}, {k: shard_name for k in tensors}, entry)
        state = self.manifest.serialize()
        persist = self.cache.persist_later(next_cache, basis.shape[1] if basis is not None else self.hidden)
        old_basis = self._basis_path(step - 1)

        def commit():  # in the background, while the next block computes
            persist()  # an in-memory cache's file: the resume state
            self.manifest.save(state)
            if os.path.exists(old_basis):
                os.remove(old_basis)

        self.committer.start(commit)

    def _embed_calibration(self, embedding, view):
        """Embedding output of every calibration sequence into `view`; returns point 0's statistics."""
        stats = self._new_stats()
        for rows in self.cache.batches(self.recipe.batch_size):
            x = embedding[torch.from_numpy(self.ids[rows[0]:rows[1]]).to(self.device)]
            self.cache.write(view, rows, x)
            stats.add(x)
        view.flush()
        return stats

    # ---- steps ----------------------------------------------------------------------------------

    def _embedding_step(self, progress):
        """Point 0: the embedding output, computed from the calibration token ids."""
        start = time.time()
        progress.set_postfix_str("embedding: calibrating")
        embedding = self._weight(self.family.embedding)
        stats = self._embed_calibration(embedding, self.cache.view("hidden_a", self.hidden))
        progress.set_postfix_str("embedding: solving")
        basis, reader, point = self._solve_point(stats, 0, "hidden_a")
        progress.set_postfix_str("embedding: propagating")
        self.cache.project_in_place("hidden_a", basis, self.recipe.batch_size, self.device)
        entry = {"step": "embedding", "points": [point], "seconds": time.time() - start}
        tensors = {"model.embed_tokens.weight": rotate_embedding(embedding, basis)}
        if self.tied_head:  # the head adapter needs Q_0 at the very end
            save_tensors(os.path.join(self.work_dir, "basis-embedding.safetensors"), {"basis": basis.cpu().contiguous()})
        self._finish_step(-1, "hidden_a", "model-embed.safetensors", tensors, basis, reader, entry)
        log.info("embedding: width %d, local error %.4f, %.1fs", point["width"], point["local_error"],
                 entry["seconds"])

    def _begin_block(self, i):
        """Start of block i: its clock, a fresh GPU peak, and the cache files it reads and writes
        (the two alternate, so the block's inputs survive until its outputs are committed)."""
        start = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        crash_point(i, "start")
        source = self.manifest.state["current_cache"]
        return start, source, "hidden_b" if source == "hidden_a" else "hidden_a"

    def _block_step(self, i, progress):
        start, source, target = self._begin_block(i)
        k_in = self.widths[2 * i]
        basis_in, reader_in = self._load_basis(i - 1)
        f = self.family

        progress.set_postfix_str(f"block {i}: loading")
        attn_norm, mlp_norm = self._block_weight(i, f.attn_norm), self._block_weight(i, f.mlp_norm)
        readers = {r: rotate_reader(fold_norm(self._block_weight(i, r), attn_norm), reader_in) for r in f.attn_readers}
        w_o, w_down = self._block_weight(i, f.attn_writer), self._block_weight(i, f.mlp_writer)
        layer = self._calibration_layer(i, k_in, {f.attn_writer: w_o, f.mlp_writer: w_down, **readers})
        readers = self._as_output(readers)  # the layer holds its own copies; keep only what is written

        # Pass A: attention, signals at the post-attention point (full width) -> scratch.
        progress.set_postfix_str(f"block {i}: calibrating attention")
        view_in = self.cache.view(source, k_in)
        scratch = self.cache.view("scratch", self.hidden)
        stats = self._new_stats()
        basis_in_t = basis_in.float().T.contiguous()
        with torch.no_grad():
            for rows in self.cache.batches(self.recipe.batch_size):
                x = self.cache.read(view_in, rows, self.device)
                kwargs = attention_inputs(self.block_config, self.rotary, x)
                update, _ = layer.self_attn(layer.input_layernorm(x), **kwargs)
                signal = x @ basis_in_t + update
                self.cache.write(scratch, rows, signal)
                stats.add(signal)
        scratch.flush()
        crash_point(i, "solving")
        progress.set_postfix_str(f"block {i}: solving attention point")
        basis_attn, reader_attn, point_attn = self._solve_point(stats, 2 * i + 1, "scratch")

        mlp_readers = {r: rotate_reader(fold_norm(self._block_weight(i, r), mlp_norm), reader_attn)
                       for r in f.mlp_readers}
        self._set_weights(layer, mlp_readers)
        basis_attn_f = basis_attn.float()
        mlp_point = None
        if self.intermediate_sizes[i] < self.source_config["intermediate_size"]:
            progress.set_postfix_str(f"block {i}: narrowing MLP neurons")
            mlp_readers, w_down, mlp_point = self._narrow_mlp(i, layer, scratch, basis_attn_f, mlp_readers, w_down)
        mlp_readers = self._as_output(mlp_readers)

        # Pass B: MLP on the narrowed post-attention residual; output-point signals -> target.
        progress.set_postfix_str(f"block {i}: calibrating MLP")
        view_out = self.cache.view(target, self.hidden)
        stats = self._new_stats()
        basis_attn_t = basis_attn_f.T.contiguous()
        with torch.no_grad():
            for rows in self.cache.batches(self.recipe.batch_size):
                narrowed = self.cache.read(scratch, rows, self.device) @ basis_attn_f
                signal = narrowed @ basis_attn_t + layer.mlp(layer.post_attention_layernorm(narrowed))
                self.cache.write(view_out, rows, signal)
                stats.add(signal)
        view_out.flush()
        progress.set_postfix_str(f"block {i}: solving MLP point")
        basis_out, reader_out, point_mlp = self._solve_point(stats, 2 * i + 2, target)
        crash_point(i, "propagating")
        progress.set_postfix_str(f"block {i}: propagating")
        self.cache.project_in_place(target, basis_out, self.recipe.batch_size, self.device)

        progress.set_postfix_str(f"block {i}: writing")
        del layer  # its weights are copies; free them before the float64 writers are made
        prefix = f"model.layers.{i}."
        tensors = {prefix + r + ".weight": w for r, w in {**readers, **mlp_readers}.items()}
        tensors[prefix + "self_attn.o_proj.weight"] = rotate_writer(w_o, basis_attn)
        tensors[prefix + "mlp.down_proj.weight"] = rotate_writer(w_down, basis_out)
        for name, matrix in (("attn_shortcut", shortcut(basis_in, basis_attn)),
                             ("mlp_shortcut", shortcut(basis_attn, basis_out))):
            if matrix is not None:
                tensors[prefix + name + ".weight"] = matrix
        rss, gpu = peak_memory_mb(self.device)
        entry = {"step": f"block {i}", "block": i, "points": [point_attn, point_mlp], "mlp": mlp_point,
                 "seconds": time.time() - start, "peak_rss_mb": rss, "peak_gpu_mb": gpu}
        self._finish_step(i, target, f"model-block-{i:05d}.safetensors", tensors, basis_out, reader_out, entry)
        log.info("block %d/%d: widths %d->%d->%d (MLP %d), local error attn %.4f mlp %.4f (pca %.4f %.4f), "
                 "%.1fs (waited %.1fs on reads), peak RSS %.0f MB (anonymous %.0f, file %.0f)%s", i + 1,
                 self.num_layers, k_in, point_attn["width"], point_mlp["width"], self.intermediate_sizes[i],
                 point_attn["local_error"], point_mlp["local_error"], point_attn["pca_error"], point_mlp["pca_error"],
                 entry["seconds"], entry["read_wait_seconds"], rss, entry["peak_anon_mb"], entry["peak_file_mb"],
                 f", GPU {gpu:.0f} MB" if gpu else "")

    def _before_blocks(self, progress, first):
        if self.recipe.basis == "shared" and first < self.num_layers:
            self.shared_basis = self._fit_shared_basis(progress)

    def _fit_shared_basis(self, progress):
        """One basis for every point (`--basis shared`): a pass over the dense model accumulates each
        point's moments, weighted so every point counts equally, and the method solves once. With one
        basis the skip paths are the identity, so the output carries no shortcut matrices."""
        path = os.path.join(self.work_dir, "shared-basis.safetensors")
        if os.path.exists(path):
            return load_file(path)["basis"].to(self.device)
        d, f = self.hidden, self.family
        total = PointStatistics(d, self.device)

        def merge(stats):
            weight = stats.count / float(torch.trace(stats.gram)) if torch.trace(stats.gram) > 0 else 0.0
            total.gram += stats.gram * weight
            total.sum += stats.sum * weight ** 0.5
            total.abs_sum += stats.abs_sum * weight ** 0.5
            total.count += stats.count

        progress.set_postfix_str("shared basis: embedding")
        views = [self.cache.view("hidden_a", d), self.cache.view("hidden_b", d)]
        merge(self._embed_calibration(self._weight(f.embedding), views[0]))
        for i in range(self.num_layers):
            progress.set_postfix_str(f"shared basis: block {i}")
            attn_norm, mlp_norm = self._block_weight(i, f.attn_norm), self._block_weight(i, f.mlp_norm)
            weights = {r: fold_norm(self._block_weight(i, r), attn_norm) for r in f.attn_readers}
            weights.update({r: fold_norm(self._block_weight(i, r), mlp_norm) for r in f.mlp_readers})
            weights.update({w: self._block_weight(i, w) for w in (f.attn_writer, f.mlp_writer)})
            layer = self._calibration_layer(i, d, weights)
            source, target = views[i % 2], views[(i + 1) % 2]
            attn_stats, mlp_stats = PointStatistics(d, self.device), PointStatistics(d, self.device)
            with torch.no_grad():
                for rows in self.cache.batches(self.recipe.batch_size):
                    x = self.cache.read(source, rows, self.device)
                    h = layer.attention_residual(x, **attention_inputs(self.block_config, self.rotary, x))
                    attn_stats.add(h)
                    y = layer.mlp_residual(h)
                    mlp_stats.add(y)
                    self.cache.write(target, rows, y)
            target.flush()
            merge(attn_stats)
            merge(mlp_stats)
        progress.set_postfix_str("shared basis: solving")
        basis, _ = self.solve(total, self.widths[0], self.options)
        save_tensors(path, {"basis": basis.cpu().contiguous()})
        log.info("shared basis: width %d, fitted on %d points of the dense model", self.widths[0],
                 2 * self.num_layers + 1)
        return basis

    def _narrow_mlp(self, i, layer, scratch, basis_attn_f, mlp_readers, w_down):
        """One pass for the intermediate activations on the narrowed prefix, then keep k of d_ff neurons."""
        stats = PointStatistics(w_down.shape[1], self.device)
        with torch.no_grad():
            for rows in self.cache.batches(self.recipe.batch_size):
                h = layer.post_attention_layernorm(self.cache.read(scratch, rows, self.device) @ basis_attn_f)
                stats.add(layer.mlp.act_fn(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        stats.offload(os.path.join(self.work_dir, f"stats-mlp-{i}.f64"))
        stats.to(self.device)
        mlp_readers, w_down, info = narrow_mlp(stats, self.intermediate_sizes[i], self.mlp_method,
                                               self.options, mlp_readers, w_down)
        stats.discard()
        self._set_weights(layer, {**mlp_readers, self.family.mlp_writer: w_down})
        return mlp_readers, w_down, info

    def _head_step(self):
        """Untied: the head reads the last point, W diag(g) M_last. Tied: the head stays the narrowed
        embedding E Q_0 and reads through a k_0 x k_last adapter Q_0ᵀ diag(g) M_last."""
        f = self.family
        _, reader_last = self._load_basis(self.num_layers - 1)
        scale = self._weight(f.final_norm)
        if self.tied_head:
            basis_0 = load_file(os.path.join(self.work_dir, "basis-embedding.safetensors"))["basis"].to(self.device)
            return {"head_adapter.weight": rotate_reader(fold_norm(basis_0.T, scale), reader_last)}
        head = self._weight(f.head if self.reader.has(f.head) else f.embedding)
        return {"lm_head.weight": by_rows(lambda rows: rotate_reader(fold_norm(rows, scale), reader_last), head)}

    # ---- the loop ---------------------------------------------------------------------------

    def run(self):
        start = self._step_started = time.time()
        self.monitor = MemoryMonitor().start()
        self.committer = BackgroundCommit()
        try:
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
        done = self._claim()
        if done is not None:
            return done
        self._prepare()
        first = self.manifest.next_block
        if first > -1:
            log.info("resuming at block %d of %d from %s", first, self.num_layers, self.work_dir)
        progress = tqdm(total=self.num_layers + 1, initial=first + 1, desc="compressing", unit="step",
                        disable=not sys.stderr.isatty(), file=sys.stderr)
        with progress:
            self.prefetcher.schedule(max(first, 0))
            self._before_blocks(progress, first)
            if first == -1:
                self._embedding_step(progress)
                progress.update(1)
            for i in range(max(first, 0), self.num_layers):
                self._block_step(i, progress)
                progress.update(1)
            progress.set_postfix_str("writing head")
            self.committer.join()
            head = self._head_step()
            sha = self.writer.write_shard("model-head.safetensors", head)
        weight_map = dict(self.manifest.state["weight_map"])
        weight_map.update({k: "model-head.safetensors" for k in head})
        summary = self._finish(weight_map, {**self.manifest.state["shards"], "model-head.safetensors": sha},
                               time.time() - start)
        self.reader.close()
        if self.out_dir != self.final_out_dir:
            OutputDir(self.final_out_dir).swap_in(self.out_dir)
            self.out_dir = summary["output"] = self.final_out_dir
        self.workspace.remove()
        return summary

    def _output_config(self, weight_map):
        config = self._model_config_fields()
        config["shortcuts"] = [[f"model.layers.{i}.{n}.weight" in weight_map for n in ("attn_shortcut", "mlp_shortcut")]
                               for i in range(self.num_layers)]
        config.update(
            architectures=["StreamResizeForCausalLM"], model_type=MODEL_TYPE, tie_word_embeddings=self.tied_head,
            head_adapter=self.tied_head, dtype=str(self.out_dtype).replace("torch.", ""),
            auto_map={"AutoConfig": "modeling_streamresize.StreamResizeConfig",
                      "AutoModelForCausalLM": "modeling_streamresize.StreamResizeForCausalLM"},
        )
        return config

    def _finish(self, weight_map, shards, seconds):
        from .checkpoint import parameter_count  # reads only headers
        total_bytes = sum(os.path.getsize(os.path.join(self.out_dir, s)) for s in shards)
        config = self._output_config(weight_map)
        steps = self.manifest.state["log"]
        source_params = self.reader.parameter_count()
        # config.json holds only what the computation decided, so a resumed run writes it byte for byte
        # the same; timings and memory go to RUN_LOG.
        config["streamresize"] = {
            "version": __version__, "method": self.recipe.method, "mlp_method": self.mlp_method,
            "method_options": self.options,
            "mlp": [step["mlp"] for step in steps if step.get("mlp")], "recipe": self.recipe.resolved(),
            "calibration_ids_sha256": self.ids_sha256, "source_parameters": source_params,
            "points": [p for step in steps for p in step["points"]],
            **self._extra_record(steps),
        }
        rss, gpu = peak_memory_mb(self.device)
        run_log = {"source": self.model_dir, "signature": self.signature, "seconds": seconds, "peak_rss_mb": rss, "peak_gpu_mb": gpu,
                   "device": str(self.device),
                   **self.monitor.run_peaks(), "placement": self.plan.placement.as_dict(),
                   "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                   "steps": [{k: v for k, v in step.items() if k != "points"} for step in steps]}
        atomic_write_json(os.path.join(self.out_dir, RUN_LOG), run_log)
        self.writer.finish(self.model_dir, config, weight_map, total_bytes)
        params = parameter_count(self.out_dir)
        summary = {"output": self.out_dir, "parameters": params, "source_parameters": source_params,
                   "parameter_ratio": params / source_params, "seconds": seconds, "peak_rss_mb": rss}
        log.info("done: %d parameters (%.1f%% of %d) in %.1fs", params, 100 * params / source_params,
                 source_params, seconds)
        return summary


    def _extra_record(self, steps):
        """Method-specific entries for config.json's "streamresize" record."""
        return {}


def compress(model_dir, out_dir, recipe, work_dir=None, restart=False, memory=None, overwrite=False):
    if recipe.method == "disp":
        from .disp_engine import DispCompressor

        return DispCompressor(model_dir, out_dir, recipe, work_dir, restart, memory, overwrite).run()
    return StreamingCompressor(model_dir, out_dir, recipe, work_dir, restart, memory, overwrite).run()
