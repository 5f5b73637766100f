"""Rotate-and-slice methods (pca, prune, dotresize): a basis at every point of the residual stream.

Point 0 is the embedding output, points 2i+1 and 2i+2 the residual after block i's attention and
after its MLP. At each point the signals' moments are accumulated on the compressed prefix, the
method's solver gives an orthonormal basis of the kept width, the writers into the point are rotated
onto it and the readers of the point read through it (their norm gains folded in, so the norms stay
weightless and exact). The three methods differ only in the solver and its options.
"""

import logging
import os
import time

import torch
from safetensors.torch import load_file

from ..arch.base import BlockShape
from ..budget import widths_for_target
from ..errors import StreamResizeError
from ..formats import HEADS_PROBLEM, SHORTCUT_PROBLEM
from ..plan import MethodFootprint
from ..modeling.modeling_streamresize import StreamResizeConfig, attention_inputs, decoder_layer_class, layer_type
from ..precision import compute_in
from ..runtime import crash_point, fault_point, peak_memory_mb
from ..statistics import Moments, add_gram_product, pca_error, relative_error, scratch_matrix
from ..transforms import by_rows, fold_norm, rotate_embedding, rotate_reader, rotate_writer, shortcut, through
from ..writer import save_tensors
from . import dotresize, pca, prune, target_width, width_multiples
from .base import WidthMethod
from .curves import CURVE_SAMPLES, CURVE_SCALE, CurveAllocation, curve_scale_for
from .heads import HeadLayout, select_heads
from .neurons import narrow_mlp
from .obs import solve_ridged
from .sensitivity import disk_bytes as sensitivity_disk_bytes, sensitivity
from .options import Option

log = logging.getLogger("streamresize")

READER = Option("pinv", str, "how readers of a narrowed point read it: pinv (projection) or lstsq (refitted by "
                "least squares on calibration moments)", choices=("pinv", "lstsq"))
ROTATE_FULL_WIDTH = Option(False, bool, "rotate points kept at full width too (tests the skip matrices)",
                           recorded=False)
SUPPORT = Option("norm", str, "which neurons are kept", choices=("norm", "variance", "mean_abs", "pca"))
# DOTResize's transport options; the defaults were chosen by measurement (BENCHMARKS.md).
TRANSPORT = {
    "support": SUPPORT,
    "cost": Option("sqeuclidean", str, "transport cost between neurons", choices=("sqeuclidean", "correlation")),
    "normalize": Option(False, bool, "normalize each neuron before the sqeuclidean cost"),
    "epsilon": Option(0.05, float, "entropic regularization, relative to the median cost", positive=True),
    "marginals": Option("uniform", str, "transport marginals", choices=("uniform", "energy")),
    "solver": Option("auto", str, "OT solver",
                     choices=("auto", "sinkhorn", "sinkhorn_log", "sinkhorn_stabilized", "emd")),
    "max_iter": Option(2000, int, "Sinkhorn iterations at most", positive=True),
    "tol": Option(1e-9, float, "Sinkhorn stopping tolerance", positive=True),
}
MLP_SUPPORT = Option("auto", str, "which MLP neurons are kept: obs (structured OBS: least output error after the "
                    "refit), norm/variance/mean_abs (a score x the down_proj column norm); auto: the `support` "
                    "option's choice (norm for pca)", choices=("auto", "norm", "variance", "mean_abs", "obs"),
                    recorded=False)
OBS_BATCH = Option(0, int, "obs: neurons removed per update of the inverse Gram (0: at most 64 updates)",
                   minimum=0, recorded=False)
SELECTION_SCALE = Option("output", str, "which heads and MLP neurons structured OBS removes in each block: those "
                         "whose removal costs the writer's output least (output), or the loss least, each output "
                         "channel weighted by the dense model's diagonal Fisher (loss)", choices=("output", "loss"),
                         recorded=False)
MLP_TARGET = Option("prefix", str, "what down_proj is refitted to when MLP neurons go: prefix (the dense MLP's "
                    "output on the compressed prefix's inputs: each block on its own) or dense (the dense model's "
                    "block output, from a second cached stream: the refit also corrects the error that reaches the "
                    "block)", choices=("prefix", "dense"), recorded=False)
TARGET_MIX = Option(1.0, float, "mlp_target=dense: weight of the dense target against the prefix one (1: dense "
                    "only)", minimum=0.0, recorded=False)
HEAD_ALLOCATION = Option("uniform", str, "attention heads: uniform (--attention-sparsity in every block), global "
                         "(--allocation global ranks each block's rounds of head removal, one query head per KV "
                         "group, with the MLP neurons under one parameter budget: per-block head counts, which "
                         "only the bundled format holds) or auto (--allocation uniform with --target-size: the same "
                         "head count in every block, chosen with the MLP width by the error curves; a stock layout)",
                         choices=("uniform", "global", "auto"))
HEAD_UNIT = Option("query", str, "what a round of head removal takes under grouped-query attention: one query head "
                   "from every KV group (query: num_key_value_heads kept) or one whole KV group with its query heads "
                   "(kv_group)", choices=("query", "kv_group"), recorded=False)
MLP_READER = Option("ot", str, "how merged MLP neurons are folded into down_proj: ot (the transport map) or lstsq "
                    "(its least-squares refit)", choices=("ot", "lstsq"))
assert set(dotresize.DEFAULTS) == set(TRANSPORT) | {"reader", "mlp_reader"}


class SlicingMethod(CurveAllocation, WidthMethod):
    SPARSITY = ("the fraction of the residual width removed at every point (SliceGPT's meaning), rounded down to a "
                "multiple of --width-multiple; --mlp-sparsity removes MLP neurons")
    solve = None  # (moments, width, options) -> (basis d x k, info)
    default_head = "tied"

    @classmethod
    def option_spec(cls, recipe):
        spec = {**cls.OPTIONS, "mlp_support": MLP_SUPPORT, "obs_batch": OBS_BATCH, "curve_samples": CURVE_SAMPLES,
                "curve_scale": CURVE_SCALE, "selection_scale": SELECTION_SCALE, "head_allocation": HEAD_ALLOCATION,
                "head_unit": HEAD_UNIT}
        if cls.mlp_method_for(recipe) == "dotresize":  # the MLP neurons are merged by OT: its options apply
            spec = {**{k: Option(o.default, o.kind, o.help, o.choices, o.minimum, o.positive, recorded=False)
                       for k, o in TRANSPORT.items()}, "mlp_reader": Option(
                "ot", str, MLP_READER.help, MLP_READER.choices, recorded=False), "mlp_target": MLP_TARGET,
                "target_mix": TARGET_MIX, **spec}
        return spec

    @classmethod
    def mlp_method_for(cls, recipe):
        return recipe.mlp_method if recipe.mlp_method != "auto" else ("dotresize" if cls.name == "dotresize"
                                                                       else "prune")

    def __init__(self, run):
        super().__init__(run)
        r, c = run.recipe, run.source_config
        self.mlp_method = self.mlp_method_for(r)
        self.reader_kind = self.options.get("reader", "pinv")
        source_tied = bool(c.get("tie_word_embeddings", False)) or not run.reader.has(run.family.head)
        head = r.head if r.head != "auto" else self.default_head
        if head not in ("tied", "untied"):
            raise StreamResizeError(f"--head {r.head}: choose auto, tied or untied")
        self.tied_head = head == "tied" and source_tied
        # A tied head reads the last point through a k x k adapter, which holds the final norm's gain; where
        # norms keep their weights (the residual whole, in its own basis) the final norm holds it instead.
        self.head_adapter = self.tied_head and run.family.norms_folded
        if self.head_adapter and r.basis != "shared" and not self.options.get("rotate_full_width", False):
            # Where every point keeps the residual whole its adapter is diag(final norm gain): stored as a
            # k-vector, and counted so by --target-size (a stock output holds it as the final norm).
            self.head_adapter = "diagonal"
        if r.basis not in ("per-point", "shared"):
            raise StreamResizeError(f"--basis {r.basis}: choose per-point or shared")
        self.shared_basis = None
        if r.allocation not in ("uniform", "global"):
            raise StreamResizeError(f"--allocation {r.allocation}: {self.name} takes uniform or global (learned is "
                                    "DISP-LLM's hypernetwork: --method disp)")
        problem = run.family.residual_problem(self.name, r, self.options)
        if problem:  # a family whose norms are not folded keeps the residual whole
            raise StreamResizeError(problem)
        self.heads_source = HeadLayout.from_config(c, by_group=self.options.get("head_unit") == "kv_group")
        self.heads_kept = self.heads_source.kept(r.attention_sparsity)
        if self.heads_kept != self.heads_source and r.basis == "shared":
            raise StreamResizeError("--attention-sparsity with --basis shared is not supported yet (the shared basis "
                                    "is fitted on the dense attention); use --basis per-point")
        if "curve_scale" in self.options:
            self.options["curve_scale"] = curve_scale_for(run.family, self.options["curve_scale"])
        head_allocation = self.options.get("head_allocation", HEAD_ALLOCATION.default)
        self.global_heads, self.auto_heads = head_allocation == "global", head_allocation == "auto"
        if self.global_heads or self.auto_heads:
            self._check_head_allocation(head_allocation)
        self._choose_widths()
        self.layer_heads = [self.heads_kept] * run.num_layers  # per block; global allocation may spread them
        self.sensitivity = None  # the loss's diagonal Fisher at each writer's output, where an option uses it
        self.dense_target = self.options.get("mlp_target", MLP_TARGET.default) == "dense"
        if self.dense_target:
            self._check_dense_target()
            self.paired_streams = ("dense",)

    def _check_head_allocation(self, kind):
        run, r = self.run, self.run.recipe
        if kind == "global" and r.allocation != "global":
            raise StreamResizeError("method option head_allocation=global ranks heads with the MLP neurons: it needs "
                                    "--allocation global")
        if kind == "auto" and (r.allocation != "uniform" or r.target_size is None or r.mlp_ratio != "fill"):
            raise StreamResizeError("method option head_allocation=auto chooses one head count for every block with "
                                    "the MLP width: it needs --allocation uniform, --target-size and --mlp-ratio fill "
                                    "(with --allocation global use head_allocation=global)")
        if r.basis != "per-point" or r.sparsity > 0:
            raise StreamResizeError(f"method option head_allocation={kind} needs the residual kept whole "
                                    "(--sparsity 0, --basis per-point)")
        if self.heads_source.rounds == 0:
            raise StreamResizeError(f"method option head_allocation={kind}: {run.model_dir} has one query head per "
                                    "KV group and one KV group; there is no head to remove")

    def _check_dense_target(self):
        """The dense stream is compared with the compressed one point by point: both must be the
        residual whole, in its own basis, and the MLP refitted by least squares."""
        run, r = self.run, self.run.recipe
        problems = []
        if any(w != run.hidden for w in self.widths) or r.basis != "per-point":
            problems.append("the residual kept whole (--sparsity 0, --basis per-point)")
        if self.options.get("rotate_full_width"):
            problems.append("no rotate_full_width")
        if self.options.get("mlp_reader") != "lstsq":  # the option exists only where dotresize merges the MLP
            problems.append("the MLP refitted by least squares (mlp_reader=lstsq)")
        if not 0.0 <= float(self.options.get("target_mix", 1.0)) <= 1.0:
            problems.append("target_mix between 0 and 1")
        if problems:
            raise StreamResizeError("method option mlp_target=dense needs " + "; ".join(problems))

    def _choose_widths(self):
        """Uniform widths from --sparsity / --mlp-sparsity, or from --target-size (the parameter budget)."""
        run, r, c = self.run, self.run.recipe, self.run.source_config
        hidden = run.hidden
        self.multiples = width_multiples(r.width_multiple, hidden, c["intermediate_size"], run.save_format,
                                         self._uniform_neuron_share() if r.allocation == "uniform" else 0.0)
        residual_multiple, mlp_multiple = self.multiples
        if r.target_size is None:
            width = target_width(hidden, r.sparsity, residual_multiple)
            intermediate = target_width(c["intermediate_size"], r.mlp_sparsity, mlp_multiple)
        else:
            width, intermediate = widths_for_target(
                self._head_config(), r.target_size, run.reader.parameter_count(), r.mlp_ratio, self.multiples,
                r.basis == "per-point" and r.sparsity > 0, self.tied_head,
                residual_width=target_width(hidden, r.sparsity, residual_multiple), adapter=self.head_adapter,
                family=run.family)
            log.info("target size %.3f: residual width %d of %d, MLP width %d of %d", r.target_size, width,
                     hidden, intermediate, c["intermediate_size"])
        self.widths = [width] * (2 * run.num_layers + 1)
        self.intermediate_sizes = [intermediate] * run.num_layers

    def _uniform_neuron_share(self):
        """One MLP neuron in every block, as a share of the source's parameters."""
        run, shape = self.run, BlockShape.from_config(self.run.source_config)
        ff, hidden = shape.intermediate, run.hidden
        neuron = shape.parameters(shape.narrowed(hidden, ff)) - shape.parameters(shape.narrowed(hidden, ff - 1))
        return run.num_layers * neuron / run.reader.parameter_count()

    def _head_config(self, kept=None):
        """The source config with `kept` head counts (default: the uniform ones; what the budget uses)."""
        c, kept = self.run.source_config, kept or self.heads_kept
        if kept == self.heads_source:
            return c
        return {**c, "num_attention_heads": kept.heads, "num_key_value_heads": kept.kv_heads, "head_dim": kept.head_dim}

    # ---- helpers ------------------------------------------------------------------------------

    def _fields(self, widths, heads):
        fields = {}
        if heads != self.heads_source:
            fields = dict(num_attention_heads=heads.heads, num_key_value_heads=heads.kv_heads, head_dim=heads.head_dim)
        return self.run.model_config_fields(residual_widths=widths, intermediate_sizes=self.intermediate_sizes,
                                            shortcuts=None, **fields)

    def _calibration_layer(self, i, k_in, weights, heads=None):
        """Block i built by the output's own layer code, reading k_in columns; its writers stay
        full width until their point is solved, and the MLP readers are set once they are known.
        `heads`: the head layout it is built with (default: the kept one)."""
        run = self.run
        widths = [run.hidden] * len(self.widths)  # inside the run, writers stay full width until solved
        widths[2 * i] = k_in
        config = StreamResizeConfig(**self._fields(widths, heads or self.layer_heads[i]))
        config._attn_implementation = run.block_config._attn_implementation
        with torch.device("meta"):
            layer = decoder_layer_class(config)(config, i)
        run.set_weights(layer, weights)
        return compute_in(layer.requires_grad_(False).eval(), run.compute_dtype)

    def _basis_path(self, step):
        return self.run.work_path(f"basis-{step}.safetensors")

    def _save_basis(self, step, basis, reader, path=None):
        """A point's basis (None: kept whole, its own coordinates; saved as a marker)."""
        if basis is None:
            tensors = {"identity": torch.tensor([self.run.hidden])}
        else:
            tensors = {"basis": basis.cpu().contiguous()}
            if reader is not basis:
                tensors["reader"] = reader.cpu().contiguous()
        save_tensors(path or self._basis_path(step), tensors)

    def _load_basis(self, step, path=None):
        """(basis, reader map) of the point a step ended on; (None, None) for a point kept whole."""
        saved = load_file(path or self._basis_path(step))
        if "basis" not in saved:
            return None, None
        basis = saved["basis"].to(self.run.device)
        return basis, saved["reader"].to(self.run.device) if "reader" in saved else basis

    def _kept_whole(self, point):
        """Whether a point keeps the full residual in its own coordinates (no basis, no statistics)."""
        return (self.widths[point] == self.run.hidden and self.shared_basis is None
                and not self.options.get("rotate_full_width", False))

    def _new_stats(self, point):
        """The point's moments, or None where it is kept whole and needs none."""
        return None if self._kept_whole(point) else Moments(self.run.hidden, self.run.device)

    def _solve_point(self, stats, point, signals):
        """Basis Q and reader map M of one point (M = Q unless readers are refitted), plus its log.
        `signals` names the cache file that holds the point's full-width signals."""
        run = self.run
        width = self.widths[point]
        if self._kept_whole(point):
            # Nothing to remove: keep the neuron basis, so no skip-path matrices are needed, and read it
            # as it is (a refit would only move the readers by its ridge; the identity keeps the head
            # adapter diagonal, a stock output's final norm).
            return None, None, {"point": point, "width": width, "local_error": 0.0, "pca_error": 0.0,
                                "identity": True}
        stats = run.reduce(stats)
        stats.offload(run.work_path(f"stats-{point}.f64"))
        stats.to(run.device)
        if self.shared_basis is not None:
            basis, info = self.shared_basis, {"shared_basis": True}
        else:
            try:
                basis, info = type(self).solve(stats, width, self.options)
            except StreamResizeError as e:
                raise StreamResizeError(f"point {point} ({self._point_name(point)}), width {width} of "
                                        f"{run.hidden}: {e}") from e
            fault_point("solved")
        reader = basis if self.reader_kind == "pinv" else self._refit_reader(signals, basis)
        info = {"point": point, "width": width, "local_error": relative_error(stats.gram, basis),
                "pca_error": pca_error(stats.gram, width), **info}
        stats.discard()
        return basis, reader, info

    @staticmethod
    def _point_name(point):
        if point == 0:
            return "the embedding output"
        return f"block {(point - 1) // 2} after its {'attention' if point % 2 else 'MLP'}"

    def _refit_reader(self, signals, basis):
        """Readers refitted by least squares on the inputs they will actually see:
        min ‖n(X) Wᵀ − n(X Q) W'ᵀ‖ with n the RMSNorm over the original width (so the narrowed
        input's smaller norm is accounted for). Returns M (d x k) with W' = W M; for PCA, M ≈ Q."""
        run = self.run
        hidden = run.hidden
        view = run.cache.view(signals, hidden)
        width, eps = basis.shape[1], run.source_config.get("rms_norm_eps", 1e-6)
        inner = torch.zeros(width, width, dtype=torch.float64, device=run.device)
        cross = torch.zeros(width, hidden, dtype=torch.float64, device=run.device)
        for rows in run.cache.batches(run.recipe.batch_size):
            x = run.cache.read(view, rows, run.device).reshape(-1, hidden).double()
            z = x @ basis
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            nz = z * torch.rsqrt(z.pow(2).sum(-1, keepdim=True) / hidden + eps)
            inner += nz.T @ nz
            cross += nz.T @ n
        inner, cross = run.reduce_tensors(inner, cross)
        inner += 1e-8 * inner.diagonal().mean().clamp_min(1e-30) * torch.eye(width, dtype=inner.dtype,
                                                                             device=inner.device)
        return torch.linalg.solve(inner, cross).T.contiguous()

    def _commit(self, step, next_cache, shard_name, tensors, basis, reader, entry):
        """The step's shard, then its basis (the next step reads it), then the manifest."""
        width = self.run.hidden if basis is None else basis.shape[1]
        self.run.commit_step(step, next_cache, width, shard_name, tensors, entry,
                             save=lambda: self._save_basis(step, basis, reader),
                             obsolete=[self._basis_path(step - 1)])

    def _embed(self, embedding, rows):
        """The embedding output of calibration sequences rows[0]:rows[1] (scaled where the family scales it,
        by its multiplier in the compute dtype)."""
        run = self.run
        x = embedding[torch.from_numpy(run.ids[rows[0]:rows[1]]).to(run.device)]
        scale = run.family.embedding_multiplier(run.source_config, run.compute_dtype)
        return x if scale is None else x * scale

    def _attention_inputs(self, i, x):
        """Mask and rotary embeddings of block i's attention for hidden states x."""
        run = self.run
        return attention_inputs(run.block_config, run.rotary, x, layer_type=layer_type(run.block_config, i))

    def _embed_calibration(self, embedding, view, stats, dense_view=None):
        """Embedding output of every calibration sequence into `view` (and `dense_view`, the dense stream's
        start), accumulated into `stats` (None: none needed); returns them."""
        run = self.run
        for rows in run.cache.batches(run.recipe.batch_size):
            x = self._embed(embedding, rows)
            run.cache.write(view, rows, x)
            if dense_view is not None:
                run.cache.write(dense_view, rows, x)
            if stats is not None:
                stats.add(x)
            fault_point("accumulating")
        view.flush()
        return stats

    # ---- steps ----------------------------------------------------------------------------------

    def embedding(self, progress):
        """Point 0: the embedding output, computed from the calibration token ids."""
        run = self.run
        start = time.time()
        crash_point(-1, "start")
        progress.set_postfix_str("embedding: calibrating")
        embedding = run.weight(run.family.embedding)
        dense_view = run.cache.view(run.paired("hidden_a")[0], run.hidden) if self.dense_target else None
        stats = self._embed_calibration(embedding, run.cache.view("hidden_a", run.hidden), self._new_stats(0),
                                        dense_view)
        if dense_view is not None:
            dense_view.flush()
        progress.set_postfix_str("embedding: solving")
        basis, reader, point = self._solve_point(stats, 0, "hidden_a")
        if basis is not None:
            progress.set_postfix_str("embedding: propagating")
            run.cache.project_in_place("hidden_a", basis, run.recipe.batch_size, run.device)
        entry = {"step": "embedding", "points": [point], "seconds": time.time() - start}
        tensors = {"model.embed_tokens.weight": rotate_embedding(embedding, basis, run.out_dtype)}
        del embedding  # its float32 copy (0.5 GB for a 7B model) is not held while the shard is written
        if self.tied_head:  # the head adapter needs Q_0 at the very end
            self._save_basis(-1, basis, basis, path=run.work_path("basis-embedding.safetensors"))
        self._commit(-1, "hidden_a", "model-embed.safetensors", tensors, basis, reader, entry)
        log.info("embedding: width %d of %d, local error %.4f (pca bound %.4f), %.1fs", point["width"],
                 run.hidden, point["local_error"], point["pca_error"], entry["seconds"])

    def block(self, i, progress):
        run = self.run
        start, source, target = run.begin_block(i)
        k_in = self.widths[2 * i]
        dense_out = None
        if self.dense_target:  # first: the dense block is gone before any of the narrowed one is loaded
            progress.set_postfix_str(f"block {i}: dense block")
            dense_out = self._dense_pass(i, source, target)
        basis_in, reader_in = self._load_basis(i - 1)
        f = run.family

        progress.set_postfix_str(f"block {i}: loading")
        attn_norm, mlp_norm = run.block_weight(i, f.attn_norm), run.block_weight(i, f.mlp_norm)
        readers = {r: rotate_reader(f.fold(run.block_weight(i, r), attn_norm), reader_in) for r in f.attn_readers}
        w_o, w_down = run.block_weight(i, f.attn_writer), run.block_weight(i, f.mlp_writer)
        # Reader biases and per-head norms: no transform of the residual touches them (a reader's bias
        # does not see its input side); head removal selects the biases' rows.
        extras = run.block_extras(i)
        heads_point = None
        if self.layer_heads[i] != self.heads_source:
            progress.set_postfix_str(f"block {i}: choosing heads")
            readers, w_o, heads_point, extras = self._narrow_heads(i, k_in, readers, w_o, source, extras)
        layer = self._calibration_layer(i, k_in, {f.attn_writer: w_o, f.mlp_writer: w_down, **readers, **extras})
        readers = run.as_output(readers)  # the layer holds its own copies; keep only what is written
        extras = run.as_output(extras)

        # Pass A: attention, signals at the post-attention point (full width) -> scratch.
        progress.set_postfix_str(f"block {i}: calibrating attention")
        view_in = run.cache.view(source, k_in)
        scratch = run.cache.view("scratch", run.hidden)
        stats = self._new_stats(2 * i + 1)
        basis_in_t = None if basis_in is None else basis_in.float().T.contiguous()
        with torch.no_grad():
            for rows in run.cache.batches(run.recipe.batch_size):
                x = run.cache.read(view_in, rows, run.device)
                update = layer.attention_update(x, **self._attention_inputs(i, x))
                signal = through(x, basis_in_t) + update
                run.cache.write(scratch, rows, signal)
                if stats is not None:
                    stats.add(signal)
                fault_point("accumulating")
        scratch.flush()
        crash_point(i, "solving")
        progress.set_postfix_str(f"block {i}: solving attention point")
        basis_attn, reader_attn, point_attn = self._solve_point(stats, 2 * i + 1, "scratch")

        mlp_readers = {r: rotate_reader(f.fold(run.block_weight(i, r), mlp_norm), reader_attn)
                       for r in f.mlp_readers}
        run.set_weights(layer, mlp_readers)
        # As written from here on: narrowing only selects their rows, and the float64 copies of a 7B
        # gate and up (720 MB) are not held through the MLP solve.
        mlp_readers = run.as_output(mlp_readers)
        basis_attn_f = None if basis_attn is None else basis_attn.float()
        mlp_point = None
        if self.intermediate_sizes[i] < run.source_config["intermediate_size"]:
            progress.set_postfix_str(f"block {i}: narrowing MLP neurons")
            mlp_readers, w_down, mlp_point = self._narrow_mlp(i, layer, scratch, basis_attn_f, mlp_readers, w_down,
                                                              dense_out)

        # Pass B: MLP on the narrowed post-attention residual; output-point signals -> target.
        progress.set_postfix_str(f"block {i}: calibrating MLP")
        view_out = run.cache.view(target, run.hidden)
        stats = self._new_stats(2 * i + 2)
        basis_attn_t = None if basis_attn_f is None else basis_attn_f.T.contiguous()
        drift = torch.zeros(2, dtype=torch.float64, device=run.device)  # ‖y − y_dense‖², ‖y_dense‖²
        with torch.no_grad():
            for rows in run.cache.batches(run.recipe.batch_size):
                narrowed = through(run.cache.read(scratch, rows, run.device), basis_attn_f)
                signal = through(narrowed, basis_attn_t) + layer.mlp_output(layer.mlp(layer.mlp_input(narrowed)))
                run.cache.write(view_out, rows, signal)
                if stats is not None:
                    stats.add(signal)
                if dense_out is not None:
                    y = run.cache.read(dense_out, rows, run.device).double()
                    drift += torch.stack([(signal.double() - y).pow(2).sum(), y.pow(2).sum()])
                fault_point("accumulating")
        view_out.flush()
        dense_error = None
        if dense_out is not None:
            drift = run.reduce_tensors(drift)[0]
            dense_error = float((drift[0] / drift[1].clamp_min(1e-300)).sqrt())
        progress.set_postfix_str(f"block {i}: solving MLP point")
        basis_out, reader_out, point_mlp = self._solve_point(stats, 2 * i + 2, target)
        crash_point(i, "propagating")
        if basis_out is not None:
            progress.set_postfix_str(f"block {i}: propagating")
            run.cache.project_in_place(target, basis_out, run.recipe.batch_size, run.device)

        progress.set_postfix_str(f"block {i}: writing")
        del layer  # its weights are copies; free them before the float64 writers are made
        prefix = f"model.layers.{i}."
        tensors = {prefix + r + ".weight": w for r, w in {**readers, **mlp_readers}.items()}
        tensors.update({prefix + name: w for name, w in extras.items()})
        tensors[prefix + "self_attn.o_proj.weight"] = rotate_writer(w_o, basis_attn)
        tensors[prefix + "mlp.down_proj.weight"] = rotate_writer(w_down, basis_out)
        for name, matrix in (("attn_shortcut", shortcut(basis_in, basis_attn)),
                             ("mlp_shortcut", shortcut(basis_attn, basis_out))):
            if matrix is not None:
                tensors[prefix + name + ".weight"] = matrix
        rss, gpu = peak_memory_mb(run.device)
        entry = {"step": f"block {i}", "block": i, "points": [point_attn, point_mlp], "mlp": mlp_point,
                 **({"attention": heads_point} if heads_point else {}),
                 **({"dense_error": dense_error} if dense_error is not None else {}),
                 "seconds": time.time() - start, "peak_rss_mb": rss, "peak_gpu_mb": gpu}
        self._commit(i, target, f"model-block-{i:05d}.safetensors", tensors, basis_out, reader_out, entry)
        mlp_text = (f"MLP {self.intermediate_sizes[i]} of {run.source_config['intermediate_size']} "
                    f"(output error {mlp_point['local_error']:.4f}, pruning {mlp_point['prune_error']:.4f}, "
                    f"solved in {mlp_point['solve_seconds']:.1f}s"
                    f"{self._underdetermined(self.intermediate_sizes[i], 'neurons')})"
                    if mlp_point else f"MLP {self.intermediate_sizes[i]}")
        # The residual points' errors only where a point is narrowed: a point kept whole has none to report.
        residual_text = "".join(
            f", residual after {name} {p['width']} of {run.hidden}: local error {p['local_error']:.4f} (pca "
            f"{p['pca_error']:.4f})" for name, p in (("attention", point_attn), ("MLP", point_mlp))
            if p["width"] < run.hidden or not p.get("identity"))
        log.info("block %d/%d: widths %d->%d->%d, %s%s, %.1fs (waited %.1fs on reads), peak RSS %.0f MB "
                 "(anonymous %.0f, file %.0f)%s", i + 1, run.num_layers, k_in, point_attn["width"], point_mlp["width"],
                 mlp_text + (f", output off the dense model's by {dense_error:.4f}" if dense_error is not None else ""),
                 residual_text, entry["seconds"], entry["read_wait_seconds"], rss, entry["peak_anon_mb"],
                 entry["peak_file_mb"], f", GPU {gpu:.0f} MB" if gpu else "")

    def prepare(self, first, progress):
        if self._loss_scaled():
            self.sensitivity = sensitivity(self, progress, int(self.options.get("curve_samples",
                                                                                  CURVE_SAMPLES.default)))
        if self.auto_heads:
            self._choose_head_count(self._curves(first, progress), self.multiples[1])
        if self.run.recipe.allocation == "global" and (self.global_heads or min(self.intermediate_sizes) < self.run.source_config[
                "intermediate_size"]):
            self._allocate_widths(first, progress)
        if self.run.recipe.basis == "shared" and first < self.run.num_layers:
            self.shared_basis = self._fit_shared_basis(progress)

    def _loss_scaled(self):
        """Whether anything weighs errors by the loss's sensitivity (a backward pass of the dense model)."""
        curves = self.run.recipe.allocation == "global" or self.auto_heads
        return (curves and self.options.get("curve_scale") == "loss") or self.options.get("selection_scale") == "loss"

    def _row_scale(self, sublayer, i, option="selection_scale"):
        """√F of block i's attention or MLP output channels where `option` (the selection's or the curves'
        scale) weighs them by the loss; None otherwise."""
        if self.options.get(option) != "loss":
            return None
        return self.sensitivity[sublayer][i].sqrt()

    def _dense_layer(self, i):
        """Block i of the source model, norms folded into the readers (the output's own layer code)."""
        run, f = self.run, self.run.family
        attn_norm, mlp_norm = run.block_weight(i, f.attn_norm), run.block_weight(i, f.mlp_norm)
        weights = {r: f.fold(run.block_weight(i, r), attn_norm) for r in f.attn_readers}
        weights.update({r: f.fold(run.block_weight(i, r), mlp_norm) for r in f.mlp_readers})
        weights.update({w: run.block_weight(i, w) for w in (f.attn_writer, f.mlp_writer)})
        layer = self._calibration_layer(i, run.hidden, {**weights, **run.block_extras(i)}, heads=self.heads_source)
        return layer, weights[f.mlp_writer]

    def _scratch(self, name, shape):
        """A zeroed float64 work matrix in the work dir's scratch file `name` (a 7B MLP's d_ff² matrices
        in file-backed pages, not anonymous memory)."""
        return scratch_matrix(self.run.work_path(f"scratch-{name}.f64"), shape)

    def _fit_shared_basis(self, progress):
        """One basis for every point (`--basis shared`): a pass over the dense model accumulates each
        point's moments, weighted so every point counts equally, and the method solves once. With one
        basis the skip paths are the identity, so the output carries no shortcut matrices."""
        run = self.run
        path = run.work_path("shared-basis.safetensors")
        if os.path.exists(path):
            return load_file(path)["basis"].to(run.device)
        d, f = run.hidden, run.family
        total = Moments(d, run.device)

        def add_point(stats):
            stats = run.reduce(stats)
            total.merge(stats, weight=stats.count / float(torch.trace(stats.gram))
                        if torch.trace(stats.gram) > 0 else 0.0)

        progress.set_postfix_str("shared basis: embedding")
        views = [run.cache.view("hidden_a", d), run.cache.view("hidden_b", d)]
        add_point(self._embed_calibration(run.weight(f.embedding), views[0], Moments(d, run.device)))
        for i in range(run.num_layers):
            progress.set_postfix_str(f"shared basis: block {i}")
            attn_norm, mlp_norm = run.block_weight(i, f.attn_norm), run.block_weight(i, f.mlp_norm)
            weights = {r: f.fold(run.block_weight(i, r), attn_norm) for r in f.attn_readers}
            weights.update({r: f.fold(run.block_weight(i, r), mlp_norm) for r in f.mlp_readers})
            weights.update({w: run.block_weight(i, w) for w in (f.attn_writer, f.mlp_writer)})
            layer = self._calibration_layer(i, d, {**weights, **run.block_extras(i)})
            source, target = views[i % 2], views[(i + 1) % 2]
            attn_stats, mlp_stats = Moments(d, run.device), Moments(d, run.device)
            with torch.no_grad():
                for rows in run.cache.batches(run.recipe.batch_size):
                    x = run.cache.read(source, rows, run.device)
                    h = layer.attention_residual(x, **self._attention_inputs(i, x))
                    attn_stats.add(h)
                    y = layer.mlp_residual(h)
                    mlp_stats.add(y)
                    run.cache.write(target, rows, y)
            target.flush()
            add_point(attn_stats)
            add_point(mlp_stats)
            fault_point("shared-basis")
        progress.set_postfix_str("shared basis: solving")
        basis, _ = type(self).solve(total, self.widths[0], self.options)
        save_tensors(path, {"basis": basis.cpu().contiguous()})
        log.info("shared basis: width %d, fitted on %d points of the dense model", self.widths[0],
                 2 * run.num_layers + 1)
        return basis

    def _narrow_heads(self, i, k_in, readers, w_o, source, extras):
        """One pass of the block's dense attention for the moments of o_proj's input, then keep the heads
        whose removal (o_proj refitted on the rest) costs the attention output least. `extras` (reader
        biases, per-head norms) are returned with the kept heads' rows."""
        run, f = self.run, self.run.family
        layout, kept = self.heads_source, self.layer_heads[i]
        layer = self._calibration_layer(i, k_in, {f.attn_writer: w_o, **readers, **extras}, heads=layout)
        width = layout.heads * layout.head_dim
        stats = Moments(width, run.device)
        hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: stats.add(args[0]))
        view_in = run.cache.view(source, k_in)
        with torch.no_grad():
            for rows in run.cache.batches(run.recipe.batch_size):
                x = run.cache.read(view_in, rows, run.device)
                layer.self_attn(layer.attention_input(x), **self._attention_inputs(i, x))
                fault_point("accumulating")
        hook.remove()
        del layer
        stats = run.reduce(stats)
        heads, kv, w_o, info = select_heads(stats.gram, w_o, layout, kept, self._row_scale("attention", i))
        fault_point("heads")
        q_role, k_role, v_role = f.attn_readers
        readers = dict(readers)
        readers[q_role] = readers[q_role][layout.rows(heads).to(run.device)]
        kv_rows = None
        if kv != list(range(layout.kv_heads)):
            kv_rows = layout.rows(kv)
            for role in (k_role, v_role):
                readers[role] = readers[role][kv_rows.to(run.device)]
        extras = f.select_head_rows(extras, layout.rows(heads), kv_rows)
        log.info("block %d: attention heads %d of %d (kept %s), o_proj output error %.4f (pruning alone %.4f%s)",
                 i, info["heads"], layout.heads, info["kept"], info["local_error"], info["prune_error"],
                 self._underdetermined(info["heads"] * layout.head_dim, "o_proj inputs"))
        return readers, w_o.float(), info, extras

    def _underdetermined(self, kept, what):
        """A note for the log where a refit has no fewer unknowns per row (`kept` inputs) than calibration
        tokens: its error on them is then zero whatever was removed, and says nothing."""
        tokens = self.run.all_ids.size  # every process's: the refit's statistics are summed over them
        return (f"; exact by construction: {tokens} calibration tokens for {kept} kept {what}, "
                f"use more tokens" if tokens <= kept else "")

    def _dense_pass(self, i, source, target):
        """Block i of the dense model on the dense stream (dense_a -> dense_b or back, in step with the
        compressed stream): the target the MLP refit aims at. Returns the output's view."""
        run = self.run
        layer, _ = self._dense_layer(i)
        view_in = run.cache.view(run.paired(source)[0], run.hidden)
        view_out = run.cache.view(run.paired(target)[0], run.hidden)
        with torch.no_grad():
            for rows in run.cache.batches(run.recipe.batch_size):
                x = run.cache.read(view_in, rows, run.device)
                h = layer.attention_residual(x, **self._attention_inputs(i, x))
                run.cache.write(view_out, rows, layer.mlp_residual(h))
                fault_point("accumulating")
        view_out.flush()
        return view_out

    def _narrow_mlp(self, i, layer, scratch, basis_attn_f, mlp_readers, w_down, dense_out=None):
        """One pass for the intermediate activations on the narrowed prefix, then keep k of d_ff neurons.
        With `dense_out` (the dense model's block output) down_proj is fitted to what takes the block's
        output there: y_dense − h, h the compressed residual the MLP adds to. Where a norm follows the
        MLP (Gemma), that is what the norm should add, so down_proj aims at its preimage (before_post_norm)."""
        run = self.run
        on_cpu = run.device.type == "cpu"  # a 7B MLP's d_ff² matrices in file-backed pages, not anonymous memory
        stats = Moments(w_down.shape[1], run.device,
                        gram_path=run.work_path(f"stats-mlp-{i}.f64.gram") if on_cpu else None)
        cross = None if dense_out is None else torch.zeros(w_down.shape, dtype=torch.float64, device=run.device)
        post_norm = (cross is not None and not run.family.norms_folded
                     and bool((run.family.post_norms or (None, None))[1]))
        with torch.no_grad():
            if post_norm:  # the norm's gain and the dense writer, once per block
                gain = layer.mlp_output(torch.ones(1, run.hidden, device=run.device))
                down_t = w_down.double().T
            for rows in run.cache.batches(run.recipe.batch_size):
                residual = through(run.cache.read(scratch, rows, run.device), basis_attn_f)
                a = run.family.mlp_hidden(layer.mlp, layer.mlp_input(residual))
                stats.add(a)
                if cross is not None:
                    wanted = run.cache.read(dense_out, rows, run.device).double() - residual.double()
                    if post_norm:
                        wanted = before_post_norm(wanted, a.double() @ down_t, gain)
                    add_gram_product(cross, wanted.reshape(-1, wanted.shape[-1]), a.reshape(-1, a.shape[-1]))
        stats = run.reduce(stats)
        stats.offload(run.work_path(f"stats-mlp-{i}.f64"))
        stats.to(run.device)
        work = self._scratch if on_cpu else None
        if cross is not None:
            cross = run.reduce_tensors(cross)[0]
            n = w_down.shape[1]
            w_down = dense_target_weight(stats.gram, cross, w_down,
                                         float(self.options.get("target_mix", TARGET_MIX.default)),
                                         work("obs-inverse", (n, n)) if work else None)
        solve_start = time.time()
        mlp_readers, w_down, info = narrow_mlp(stats, self.intermediate_sizes[i], self.mlp_method,
                                               self.options, mlp_readers, w_down, work, self._row_scale("mlp", i))
        info["solve_seconds"] = round(time.time() - solve_start, 2)
        fault_point("narrowed")
        stats.discard()
        run.set_weights(layer, {**mlp_readers, run.family.mlp_writer: w_down})
        return mlp_readers, w_down, info

    def head(self):
        """Untied: the head reads the last point, W diag(g) M_last. Tied: the head stays the narrowed
        embedding E Q_0 and reads through a k_0 x k_last adapter Q_0ᵀ diag(g) M_last."""
        run, f = self.run, self.run.family
        _, reader_last = self._load_basis(run.num_layers - 1)
        scale = run.weight(f.final_norm)
        if not f.norms_folded:  # the final norm keeps its weight; the residual is whole, in its own basis
            head = {f.final_norm: scale}
            if not self.tied_head:
                source = run.weight(f.head if run.reader.has(f.head) else f.embedding)
                head["lm_head.weight"] = by_rows(lambda rows: rotate_reader(rows, reader_last), source,
                                                 dtype=run.out_dtype)
            return head
        if self.tied_head:
            basis_0, _ = self._load_basis(-1, path=run.work_path("basis-embedding.safetensors"))
            if basis_0 is None:
                basis_0 = torch.eye(run.hidden, dtype=torch.float64, device=run.device)
            adapter = rotate_reader(fold_norm(basis_0.T, scale), reader_last)
            if self._diagonal_adapter():
                if not torch.equal(adapter, torch.diag(adapter.diagonal())):
                    raise RuntimeError("the residual was kept whole, yet the head adapter is not diagonal")
                adapter = adapter.diagonal().contiguous()
            return {"head_adapter.weight": adapter}
        head = run.weight(f.head if run.reader.has(f.head) else f.embedding)
        return {"lm_head.weight": by_rows(lambda rows: rotate_reader(fold_norm(rows, scale), reader_last), head,
                                          dtype=run.out_dtype)}

    def _diagonal_adapter(self):
        """Whether the tied head's adapter is stored as a k-vector (the residual kept whole, as counted)."""
        return self.head_adapter == "diagonal" and self.widths[-1] == self.run.hidden

    # ---- the output ---------------------------------------------------------------------------

    def output_config(self, config, weight_map):
        config.update(residual_widths=list(self.widths), intermediate_sizes=self.intermediate_sizes,
                      shortcuts=[[f"model.layers.{i}.{n}.weight" in weight_map for n in ("attn_shortcut", "mlp_shortcut")]
                                 for i in range(self.run.num_layers)],
                      tie_word_embeddings=self.tied_head,
                      head_adapter="diagonal" if self._diagonal_adapter() else bool(self.head_adapter))
        if len(set(self.layer_heads)) > 1:  # per-block query heads: only the bundled modeling holds them
            config.update(attention_heads=[[h.heads, h.kv_heads] for h in self.layer_heads],
                          head_dim=self.heads_source.head_dim)
        elif self.layer_heads[0] != self.heads_source:
            kept = self.layer_heads[0]
            config.update(num_attention_heads=kept.heads, num_key_value_heads=kept.kv_heads, head_dim=kept.head_dim)
        return config

    def stock_problem(self):
        # Rotations per point (pca, dotresize) give skip matrices; a selection (prune) may not, when
        # every point keeps the same channels: that is only known at the end.
        rotates = self.name != "prune"
        if self.run.recipe.basis == "per-point" and rotates and (min(self.widths) < self.run.hidden
                                                                 or self.options.get("rotate_full_width")):
            return SHORTCUT_PROBLEM
        if self.global_heads:
            return HEADS_PROBLEM
        return None

    def record(self, steps):
        timing = ("solve_seconds",)  # in the run log, not in config.json: an output's bytes do not depend on the clock
        record = {"mlp_method": self.mlp_method,
                  "mlp": [{k: v for k, v in step["mlp"].items() if k not in timing} for step in steps if step.get("mlp")]}
        if any(h != self.heads_source for h in self.layer_heads):
            record["attention"] = [step["attention"] for step in steps if step.get("attention")]
        return record

    def footprint(self):
        """What the planner needs of this run (plan.py)."""
        run, r = self.run, self.run.recipe
        full = [k == run.hidden and not self.options.get("rotate_full_width", False) for k in self.widths]
        selection = self.name == "prune" and self.reader_kind == "pinv"
        per_point = r.basis == "per-point"
        return MethodFootprint(
            # global allocation decides per-block MLP widths in prepare(): plan every block for the widest
            # narrowed MLP (one multiple below the source's), whose statistics and solve are the largest
            # (head_allocation=auto may widen the MLP to pay for heads: planned the same way)
            widths=list(self.widths), intermediate_sizes=list(self.intermediate_sizes)
            if r.allocation != "global" and not self.auto_heads
            else [run.source_config["intermediate_size"] - self.multiples[1]] * run.num_layers,
            tied_head=self.tied_head,
            cache_files=3 + 2 * len(self.paired_streams), shortcuts=per_point and (not all(full) or bool(self.options.get("rotate_full_width"))),
            rotated=[not (f or selection) for f in full],
            eigh_points=[not f and per_point and (self.name == "pca" or self.options.get("support") == "pca")
                         for f in full],
            refit_readers=self.reader_kind == "lstsq", mlp_in_files=run.device.type == "cpu",
            mlp_obs=self.options.get("mlp_support") == "obs", kept_whole=all(full) and per_point,
            sensitivity_bytes=sensitivity_disk_bytes(
                run.num_layers, min(r.num_calibration_samples, int(self.options.get("curve_samples", CURVE_SAMPLES.default))),
                r.max_seq_length, run.hidden) if self._loss_scaled() else 0)


class PcaMethod(SlicingMethod):
    """SliceGPT-style: the top principal directions at every point."""

    name = "pca"
    default_head = "untied"
    OPTIONS = {"reader": READER, "rotate_full_width": ROTATE_FULL_WIDTH}
    solve = staticmethod(pca.solve)


class PruneMethod(SlicingMethod):
    """Keep the support's neurons, drop the rest: the baseline DOTResize adds its merge to."""

    name = "prune"
    OPTIONS = {"support": SUPPORT, "reader": READER, "rotate_full_width": ROTATE_FULL_WIDTH}
    solve = staticmethod(prune.solve)


class DotResizeMethod(SlicingMethod):
    """The support's neurons, with the dropped ones merged in by entropic OT (QR factor kept)."""

    name = "dotresize"
    OPTIONS = {**TRANSPORT, "reader": Option("lstsq", str, READER.help, READER.choices),
               "mlp_reader": Option("lstsq", str, MLP_READER.help, MLP_READER.choices),
               "rotate_full_width": ROTATE_FULL_WIDTH}
    solve = staticmethod(dotresize.solve)


def before_post_norm(wanted, prefix, gain):
    """What a writer followed by an RMS norm of gain `gain` should output for the norm to add `wanted`:
    wanted / gain (the norm forgets the scale), each token scaled to the RMS of `prefix` (the dense
    writer's own output there), so that a mix with the prefix target stays in proportion. A gain under
    1e-3 of the mean |gain| is held at that floor: a channel the norm mutes is not blown up."""
    g = gain.double().reshape(-1)
    floor = 1e-3 * g.abs().mean()
    g = torch.where(g.abs() < floor, torch.where(g < 0, -floor, floor), g)
    preimage = wanted / g

    def rms(t):
        return t.pow(2).mean(-1, keepdim=True).sqrt()

    return preimage * (rms(prefix) / rms(preimage).clamp_min(1e-30))


def dense_target_weight(gram, cross, down, mix, buffer=None):
    """The d x d_ff writer whose output, on these activations, is the least-squares projection of the
    wanted target t = mix·(y_dense − h) + (1 − mix)·W a. Since any kept-set refit lies in the same
    span, ‖W_S a_S − t‖² = ‖W_S a_S − W* a‖² + const: OBS selection and the refit against W* give
    the optimum against t. `gram` = Σ a aᵀ, `cross` = Σ (y_dense − h) aᵀ over the same tokens (float64);
    `cross` is consumed: the target and the solution are built in it, a few rows at a time, since each
    d x d_ff copy of a 7B MLP is 0.36 GB of anonymous memory."""
    if mix != 1.0:
        for r0 in range(0, cross.shape[0], 512):
            cross[r0:r0 + 512].mul_(mix).addmm_(down[r0:r0 + 512].to(cross), gram, alpha=1.0 - mix)
    return solve_ridged(lambda inner: inner.copy_(gram), gram.shape[0], cross.T, 1e-6, buffer,
                        overwrite=True).T.to(gram.device)
