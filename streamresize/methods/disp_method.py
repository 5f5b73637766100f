"""DISP-LLM as a width method of the pipeline.

A pruned block keeps the dense block's interface (full-width residual in and out), so blocks are
pruned one at a time, in order, on hidden states from the already-pruned prefix. Per block:

    attention inputs I1 (scores on the normed input) -> attention outputs I2 (energy of the update)
    -> MLP inputs I3 -> MLP neurons I4 -> MLP outputs I5 -> write the block's outputs

each choice made on the block as pruned so far. `--allocation global` first runs the dense model on a
few calibration sequences and records, per block, the output error at several widths; one budget is
then shared across blocks (methods/disp.py). Embedding, final norm and head are copied unchanged.
"""

import json
import logging
import os
import time

import torch

from ..errors import StreamResizeError
from ..formats import DISP_PROBLEM
from ..modeling.modeling_streamresize import DispDecoderLayer, StreamResizeConfig, attention_inputs
from ..plan import MethodFootprint
from ..runtime import crash_point, fault_point, peak_memory_mb
from ..writer import atomic_write_json
from . import disp, disp_learned
from .base import WidthMethod
from .options import Option

log = logging.getLogger("streamresize")
INDEX_NAMES = ("attn_in_index", "attn_out_index", "mlp_in_index", "mlp_out_index")


class DispMethod(WidthMethod):
    """DISP-LLM: every block reads and writes its own subset of residual channels.

    --allocation says how the parameter budget is spread over blocks and groups."""

    name = "disp"
    SPARSITY = ("the fraction of the block-linear parameters (q, k, v, o, gate, up, down) removed, the DISP-LLM "
                "paper's pruning ratio; the residual keeps its width")
    OPTIONS = {
        # refit on by default: on SmolLM2-135M at sparsity 0.3 it takes perplexity from 502 to 144
        # (BENCHMARKS.md); refit=false is the paper's variant (no weight updates).
        "refit": Option(True, bool, "least-squares refit of the kept weights"),
        "curve_samples": Option(16, int, "sequences the global allocation's error curves (and the logged "
                                "block error) are measured on", positive=True),
        "curve_points": Option(8, int, "widths per error curve", minimum=2),
        "learn_steps": Option(200, int, "learned allocation: optimizer steps", positive=True),
        "learn_lr": Option(1e-3, float, "learned allocation: learning rate", positive=True),
        "learn_lambda": Option(6.0, float, "learned allocation: weight of the budget penalty", minimum=0),
        "learn_tau": Option(0.5, float, "learned allocation: Gumbel-sigmoid temperature", positive=True),
        "learn_batch": Option(1, int, "learned allocation: sequences per step", positive=True),
        "learn_seq": Option(256, int, "learned allocation: tokens per sequence", positive=True),
    }
    assert {k: o.default for k, o in OPTIONS.items()} == {**disp.DEFAULTS, **disp_learned.DEFAULTS}
    cache_files = ("update",)
    # Selection compares index sets chosen from sums of squares; keep the block in float32 on every
    # device so those choices do not depend on the compute precision.
    fixed_compute_dtype = torch.float32

    def __init__(self, run):
        super().__init__(run)
        r, c = run.recipe, run.source_config
        source_tied = bool(c.get("tie_word_embeddings", False)) or not run.reader.has(run.family.head)
        if r.head not in ("auto", "tied", "untied"):
            raise StreamResizeError(f"--head {r.head}: choose auto, tied or untied")
        self.tied_head = r.head in ("auto", "tied") and source_tied
        disp.check_allocation(r.allocation)
        # Index sets are bundled-only; auto keeps DISP's fine granularity.
        self.multiple = 8 if r.width_multiple == "auto" else int(r.width_multiple)
        self.shape = run.shape
        shapes = [self.shape] * run.num_layers
        self.budget = disp.block_budget(shapes, r.sparsity, r.target_size, run.reader.parameter_count())
        self.curves = None
        self.disp_widths = None
        if r.allocation == "uniform":
            self.disp_widths = disp.uniform_widths(shapes, self.budget, self.multiple)

    # ---- the pruned block -------------------------------------------------------------------

    def _disp_layer(self, i, weights):
        """Block i at full index sets, with the dense weights; pruning narrows it in place."""
        run = self.run
        fields = run.model_config_fields(residual_widths=[run.hidden] * (2 * run.num_layers + 1),
                                         intermediate_sizes=[self.shape.intermediate] * run.num_layers,
                                         shortcuts=None, disp_widths=[list(self.shape.full)] * run.num_layers)
        config = StreamResizeConfig(**fields)
        config._attn_implementation = self.run.block_config._attn_implementation
        with torch.device("meta"):
            layer = DispDecoderLayer(config, i)
        layer.to_empty(device=self.run.device)
        for name in INDEX_NAMES:
            setattr(layer, name, torch.arange(getattr(layer, name).numel(), device=self.run.device))
        self.run.set_weights(layer, weights)
        return layer.requires_grad_(False).eval()

    def _dense_weights(self, i):
        f = self.run.family
        roles = (f.attn_norm, f.mlp_norm, *f.attn_readers, f.attn_writer, *f.mlp_readers, f.mlp_writer)
        # plus reader biases and per-head norms: index sets select a reader's input columns, which its
        # bias does not see; they are written with the layer's parameters
        return {**{role: self.run.block_weight(i, role) for role in roles}, **self.run.block_extras(i)}

    def _read(self, view, rows):
        return self.run.cache.read(view, rows, self.run.device)

    def _moments(self, batches, inputs, width, gram):
        """E[z²] per channel and, for the refit, E[z zᵀ], of z = inputs(rows) over the batches."""
        square = torch.zeros(width, dtype=torch.float64, device=self.run.device)
        second = torch.zeros(width, width, dtype=torch.float64, device=self.run.device) if gram else None
        count = 0
        for rows in batches:
            z, weight = inputs(rows)
            z = z.reshape(-1, width).double()
            weight = weight.reshape(-1, 1).double()
            square += (z.pow(2) * weight).sum(0)
            if gram:
                second += (z * weight).T @ z
            count += z.shape[0]
            fault_point("accumulating")
        square, count = self.run.reduce_tensors(square)[0], self.run.reduce_count(count)
        if gram:
            self.run.reduce_tensors(second)
        return square / count, (second / count if gram else None)

    def _energy(self, batches, update):
        """Σ_t w_t u_tj² per output channel of a sub-block's update u, each token weighted by the
        inverse mean square of the residual it is added to (what the next norm divides by)."""
        energy = torch.zeros(self.run.hidden, dtype=torch.float64, device=self.run.device)
        for rows in batches:
            u, residual = update(rows)
            weight = 1.0 / (residual.double().pow(2).mean(-1, keepdim=True) + 1e-12)
            energy += (u.double().pow(2) * weight).reshape(-1, self.run.hidden).sum(0)
        return self.run.reduce_tensors(energy)[0]

    def _prune_block(self, i, weights, widths, source, batches, emit, progress=None, label=""):
        """Choose block i's index sets at `widths` on the hidden states in `source` (the pruned
        prefix's outputs), narrowing the layer group by group; emit(rows, y) gets the pruned block's
        outputs. Each sub-block runs once: its update waits in a cache file while its output
        channels are chosen. Returns (tensors to store, info)."""
        f, d = self.run.family, self.run.hidden
        refit = bool(self.options["refit"])
        n_attn_in, n_attn_out, n_mlp_in, n_hidden, n_mlp_out = widths
        layer = self._disp_layer(i, weights)
        attn, mlp = layer.self_attn, layer.mlp
        scratch, update = self.run.cache.view("scratch", d), self.run.cache.view("update", d)

        def status(text):
            if progress is not None:
                progress.set_postfix_str(f"block {i}{label}: {text}")

        def ones(x):
            return torch.ones(x.shape[:-1], device=x.device)

        def kept_share(scores, index):
            return float(scores[index].sum() / scores.sum().clamp_min(1e-30))

        with torch.no_grad():
            status("attention inputs")

            def normed_input(rows):
                x = self._read(source, rows)
                return layer.input_layernorm(x), ones(x)

            square, gram = self._moments(batches, normed_input, d, refit)
            scores = disp.input_scores(square, [weights[r] for r in f.attn_readers])
            attn_in = disp.top_indices(scores, n_attn_in)
            for r in f.attn_readers:
                w = weights[r]
                self.run.set_weights(layer, {r: disp.refit_columns(w, gram, attn_in) if refit else w[:, attn_in]})
            layer.attn_in_index = attn_in
            fault_point("selected")
            kept = {"attn_in": kept_share(scores, attn_in)}

            status("attention outputs")

            def attention_update(rows):  # the full-width update waits in the scratch file
                x = self._read(source, rows)
                u, _ = attn(layer.input_layernorm(x).index_select(-1, attn_in),
                            **attention_inputs(self.run.block_config, self.run.rotary, x))
                self.run.cache.write(scratch, rows, u)
                return u, x + u

            energy = self._energy(batches, attention_update)
            scratch.flush()
            attn_out = disp.top_indices(energy, n_attn_out)
            self.run.set_weights(layer, {f.attn_writer: weights[f.attn_writer][attn_out]})
            layer.attn_out_index = attn_out
            kept["attn_out"] = kept_share(energy, attn_out)

            status("MLP inputs")

            def attention_residual(rows):  # h = x + u on I2 replaces u in the scratch file
                x, u = self._read(source, rows), self._read(scratch, rows)
                h = x.index_add(-1, attn_out, u.index_select(-1, attn_out))
                self.run.cache.write(scratch, rows, h)
                return layer.post_attention_layernorm(h), ones(h)

            square, gram = self._moments(batches, attention_residual, d, refit)
            scratch.flush()
            scores = disp.input_scores(square, [weights[r] for r in f.mlp_readers])
            mlp_in = disp.top_indices(scores, n_mlp_in)
            for r in f.mlp_readers:
                w = weights[r]
                self.run.set_weights(layer, {r: disp.refit_columns(w, gram, mlp_in) if refit else w[:, mlp_in]})
            layer.mlp_in_index = mlp_in
            fault_point("selected")
            kept["mlp_in"] = kept_share(scores, mlp_in)

            status("MLP neurons")

            def neurons(rows):
                h = self._read(scratch, rows)
                z = layer.post_attention_layernorm(h).index_select(-1, mlp_in)
                a = self.run.family.mlp_hidden(mlp, z)
                return a, 1.0 / (h.double().pow(2).mean(-1) + 1e-12)

            square, gram = self._moments(batches, neurons, self.shape.intermediate, refit)
            w_down = weights[f.mlp_writer]
            scores = square * w_down.double().pow(2).sum(0)
            hidden = disp.top_indices(scores, n_hidden)
            self.run.set_weights(layer, {r: layer.get_submodule(r).weight[hidden] for r in f.mlp_readers})
            self.run.set_weights(layer, {f.mlp_writer: disp.refit_columns(w_down, gram, hidden) if refit
                                      else w_down[:, hidden]})
            kept["mlp_hidden"] = kept_share(scores, hidden)
            fault_point("selected")

            status("MLP outputs")

            def mlp_update(rows):  # the full-width update waits in the update file
                h = self._read(scratch, rows)
                m = mlp(layer.post_attention_layernorm(h).index_select(-1, mlp_in))
                self.run.cache.write(update, rows, m)
                return m, h + m

            energy = self._energy(batches, mlp_update)
            update.flush()
            mlp_out = disp.top_indices(energy, n_mlp_out)
            self.run.set_weights(layer, {f.mlp_writer: layer.get_submodule(f.mlp_writer).weight[mlp_out]})
            layer.mlp_out_index = mlp_out
            kept["mlp_out"] = kept_share(energy, mlp_out)

            status("writing outputs")
            for rows in batches:
                h, m = self._read(scratch, rows), self._read(update, rows)
                emit(rows, h.index_add(-1, mlp_out, m.index_select(-1, mlp_out)))

        prefix = f"model.layers.{i}."
        tensors = {prefix + name: p.detach() for name, p in layer.named_parameters()}
        tensors.update({prefix + name: getattr(layer, name).to(torch.int64) for name in INDEX_NAMES})
        info = {"block": i, "widths": list(widths), "parameters": self.shape.parameters(widths), "kept_score": kept}
        return tensors, info

    # ---- global allocation: error-versus-width curves on the dense model -----------------------

    def _curve_rows(self):
        n = min(self.run.ids.shape[0], int(self.options["curve_samples"]))
        return [(a, min(b, n)) for a, b in self.run.cache.batches(self.run.recipe.batch_size) if a < n]

    def _block_curves(self, i, weights, source, dense_out, batches):
        """Error-versus-width curve of each group of block i: the block's output error (per token,
        relative to ‖y‖²) when only that group is narrowed, on dense inputs. Output groups (I2, I5)
        follow exactly from the updates' channel energies; the others are measured."""
        f, d = self.run.family, self.run.hidden
        refit = bool(self.options["refit"])
        layer = self._disp_layer(i, weights)
        attn, mlp = layer.self_attn, layer.mlp
        levels = [disp.widths_at(self.shape, keep, self.multiple)
                  for keep in disp.curve_levels(int(self.options["curve_points"]))]

        def dense(rows):
            x = self._read(source, rows)
            kwargs = attention_inputs(self.run.block_config, self.run.rotary, x)
            xn = layer.input_layernorm(x)
            u, _ = attn(xn, **kwargs)
            h = x + u
            z = layer.post_attention_layernorm(h)
            a = self.run.family.mlp_hidden(mlp, z)
            m = mlp.down_proj(a)
            y = h + m
            weight = 1.0 / y.double().pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
            return x, kwargs, xn, u, z, a, m, y, weight

        sums = {name: 0.0 for name in ("xn", "z", "a", "u", "m")}
        grams = {"xn": 0.0, "z": 0.0, "a": 0.0}
        tokens = 0
        for rows in batches:  # moments and energies, and the dense outputs for the next block
            x, kwargs, xn, u, z, a, m, y, weight = dense(rows)
            self.run.cache.write(dense_out, rows, y)
            flat = {"xn": xn, "z": z, "a": a, "u": u, "m": m}
            for name, t in flat.items():
                t2 = t.double().reshape(-1, t.shape[-1])
                w = weight.reshape(-1, 1) if name in ("u", "m", "a") else 1.0
                sums[name] = sums[name] + (t2.pow(2) * w).sum(0)
                if refit and name in grams:
                    grams[name] = grams[name] + (t2 * w).T @ t2
            tokens += x.shape[0] * x.shape[1]
        self.run.reduce_tensors(*[t for t in (*sums.values(), *grams.values()) if torch.is_tensor(t)])
        tokens = self.run.reduce_count(tokens)
        dense_out.flush()
        mean = {k: v / tokens for k, v in sums.items()}
        grams = {k: (v / tokens if refit else None) for k, v in grams.items()}

        attn_scores = disp.input_scores(mean["xn"], [weights[r] for r in f.attn_readers])
        mlp_scores = disp.input_scores(mean["z"], [weights[r] for r in f.mlp_readers])
        w_down = weights[f.mlp_writer]
        neuron_scores = mean["a"] * w_down.double().pow(2).sum(0)

        def sliced(readers, gram, index):
            return {r: (disp.refit_columns(weights[r], gram, index) if refit else weights[r][:, index]).float()
                    for r in readers}

        variants = []  # per level: (attention input index, q/k/v), (MLP input index, gate/up), (neurons, down)
        for widths in levels:
            i1 = disp.top_indices(attn_scores, widths[0])
            i3 = disp.top_indices(mlp_scores, widths[2])
            i4 = disp.top_indices(neuron_scores, widths[3])
            down = disp.refit_columns(w_down, grams["a"], i4) if refit else w_down[:, i4]
            variants.append(((i1, sliced(f.attn_readers, grams["xn"], i1)), (i3, sliced(f.mlp_readers, grams["z"], i3)),
                             (i4, down.float())))
        measured = torch.zeros(len(levels), 3, dtype=torch.float64)
        q_role, k_role, v_role = f.attn_readers
        gate_role, up_role = f.mlp_readers
        for rows in batches:
            x, kwargs, xn, u, z, a, m, y, weight = dense(rows)
            for j, ((i1, qkv), (i3, gu), (i4, down)) in enumerate(variants):
                self.run.set_weights(layer, qkv)
                u_j, _ = attn(xn.index_select(-1, i1), **kwargs)
                zi = z.index_select(-1, i3)
                a_j = mlp.act_fn(torch.nn.functional.linear(zi, gu[gate_role])) * torch.nn.functional.linear(zi, gu[up_role])
                m_j = mlp.down_proj(a_j)
                m_k = torch.nn.functional.linear(a.index_select(-1, i4), down)
                for c, (new, old) in enumerate(((u_j, u), (m_j, m), (m_k, m))):
                    measured[j, c] += ((new.double() - old.double()).pow(2) * weight).sum().cpu()
            self.run.set_weights(layer, {r: weights[r] for r in f.attn_readers})
        measured = self.run.reduce_tensors(measured)[0] / tokens

        def dropped(energy, n):
            return float(energy.sum() - energy[disp.top_indices(energy, n)].sum())

        curves = []
        for g in range(5):
            curve = {}
            for j, widths in enumerate(levels):
                n = widths[g]
                if g == 1:
                    curve[n] = dropped(mean["u"], n)
                elif g == 4:
                    curve[n] = dropped(mean["m"], n)
                else:
                    curve[n] = float(measured[j, {0: 0, 2: 1, 3: 2}[g]])
            curves.append(curve)
        return curves

    def _measure_curves(self, progress):
        """Every block's per-group error curves, on dense inputs from the first `curve_samples` sequences."""
        d, f = self.run.hidden, self.run.family
        batches = self._curve_rows()
        views = [self.run.cache.view("hidden_a", d), self.run.cache.view("hidden_b", d)]
        embedding = self.run.weight(f.embedding)
        for rows in batches:
            self.run.cache.write(views[0], rows, embedding[torch.from_numpy(self.run.ids[rows[0]:rows[1]]).to(self.run.device)])
        views[0].flush()
        del embedding
        curves = []
        with torch.no_grad():
            for i in range(self.run.num_layers):
                progress.set_postfix_str(f"error curves: block {i}")
                block = self._block_curves(i, self._dense_weights(i), views[i % 2], views[(i + 1) % 2], batches)
                curves.append(block)
                fault_point("curves")
                log.info("error curves block %d (error at the narrowest level measured): %s", i,
                         ", ".join(f"{g} {min(c.items())[1]:.4f}" for g, c in zip(disp.GROUPS, block)))
        return curves

    def prepare(self, first, progress):
        if self.run.recipe.allocation == "learned":
            self._learned_widths(first)
        if self.run.recipe.allocation != "global":
            return
        path = os.path.join(self.run.work_dir, "disp-curves.json")
        if os.path.exists(path):
            with open(path) as f:
                self.curves = [[{int(k): v for k, v in c.items()} for c in block] for block in json.load(f)]
        elif first > -1:
            raise StreamResizeError(f"{self.run.work_dir}: the error curves of this run are missing; rerun with --restart")
        else:
            start = time.time()
            self.curves = self._measure_curves(progress)
            atomic_write_json(path, self._curves_json())
            log.info("error curves of %d blocks in %.1fs", self.run.num_layers, time.time() - start)
        self.disp_widths = disp.global_widths([self.shape] * self.run.num_layers, self.curves, self.budget,
                                              self.multiple)

    def _learned_widths(self, first):
        """The paper's hypernetwork picks the widths (saved, so a resumed run reuses them)."""
        path = os.path.join(self.run.work_dir, "disp-learned.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
        elif first > -1:
            raise StreamResizeError(f"{self.run.work_dir}: the learned widths of this run are missing; rerun with --restart")
        else:
            start = time.time()
            widths, history = disp_learned.learn_widths(self.run.model_dir, self.run.ids, self.shape, self.budget,
                                                        self.options, self.run.device, self.run.recipe.seed)
            saved = {"widths": [list(w) for w in widths], "history": history, "seconds": time.time() - start}
            atomic_write_json(path, saved)
        self.learned = saved
        self.disp_widths = disp_learned.round_widths(saved["widths"], self.shape, self.multiple)

    # ---- steps ----------------------------------------------------------------------------------

    def embedding(self, progress):
        start = time.time()
        crash_point(-1, "start")
        progress.set_postfix_str("embedding")
        embedding = self.run.weight(self.run.family.embedding)
        view = self.run.cache.view("hidden_a", self.run.hidden)
        for rows in self.run.cache.batches(self.run.recipe.batch_size):
            self.run.cache.write(view, rows, embedding[torch.from_numpy(self.run.ids[rows[0]:rows[1]]).to(self.run.device)])
        view.flush()
        entry = {"step": "embedding", "points": [], "seconds": time.time() - start}
        self.run.commit_step(-1, "hidden_a", self.run.hidden, "model-embed.safetensors",
                             {"model.embed_tokens.weight": embedding}, entry)

    def block(self, i, progress):
        start, source, target = self.run.begin_block(i)
        progress.set_postfix_str(f"block {i}: loading")
        weights = self._dense_weights(i)
        widths = self.disp_widths[i]
        out = self.run.cache.view(target, self.run.hidden)
        dense = self._disp_layer(i, weights)
        error = torch.zeros((), dtype=torch.float64)
        source_view = self.run.cache.view(source, self.run.hidden)
        measured = min(self.run.ids.shape[0], int(self.options["curve_samples"]))

        def emit(rows, y):
            """The pruned outputs go to the next block; on the first sequences, their error against
            the dense block's outputs is measured for the log."""
            if rows[0] < measured:
                part = (rows[0], min(rows[1], measured))
                x = self._read(source_view, part)
                ref = dense(x, **attention_inputs(self.run.block_config, self.run.rotary, x)).double()
                y_part = y[:part[1] - part[0]].double()
                error.add_(((y_part - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-30)).sum().cpu())
            self.run.cache.write(out, rows, y)

        crash_point(i, "solving")
        tensors, info = self._prune_block(i, weights, widths, source_view, self.run.cache.batches(self.run.recipe.batch_size),
                                          emit, progress)
        out.flush()
        crash_point(i, "propagating")
        info["relative_error"] = float(error) / (measured * self.run.ids.shape[1])
        rss, gpu = peak_memory_mb(self.run.device)
        entry = {"step": f"block {i}", "block": i, "points": [], "disp": info, "seconds": time.time() - start,
                 "peak_rss_mb": rss, "peak_gpu_mb": gpu}
        self.run.commit_step(i, target, self.run.hidden, f"model-block-{i:05d}.safetensors", tensors, entry)
        kept = info["kept_score"]
        log.info("block %d/%d: index sets %s of %s (%.1f%% of the block's parameters), kept score attn in %.3f "
                 "out %.3f, mlp in %.3f neurons %.3f out %.3f, relative output error %.4f, %.1fs, peak RSS %.0f MB%s",
                 i + 1, self.run.num_layers, list(widths), list(self.shape.full),
                 100 * info["parameters"] / self.shape.parameters(self.shape.full), kept["attn_in"],
                 kept["attn_out"], kept["mlp_in"], kept["mlp_hidden"], kept["mlp_out"], info["relative_error"],
                 entry["seconds"], rss, f", GPU {gpu:.0f} MB" if gpu else "")

    def head(self):
        f = self.run.family
        tensors = {"model.norm.weight": self.run.weight(f.final_norm)}
        if not self.tied_head:
            tensors["lm_head.weight"] = self.run.weight(f.head if self.run.reader.has(f.head) else f.embedding)
        return tensors

    def footprint(self):
        """The residual keeps its width: no rotations and no skip paths; the updates wait in a fourth
        cache file while their output channels are chosen (plan.py)."""
        run = self.run
        points = 2 * run.num_layers + 1
        return MethodFootprint(widths=[run.hidden] * points, intermediate_sizes=[self.shape.intermediate] * run.num_layers,
                               tied_head=self.tied_head, cache_files=3 + len(self.cache_files), shortcuts=False,
                               rotated=[False] * points, eigh_points=[False] * points, refit_readers=False)

    def stock_problem(self):
        return DISP_PROBLEM

    def output_config(self, config, weight_map):
        config.update(residual_widths=None, intermediate_sizes=None, shortcuts=None, head_adapter=False,
                      tie_word_embeddings=self.tied_head, disp_widths=[list(w) for w in self.disp_widths])
        return config

    def _curves_json(self):
        return [[{str(k): v for k, v in sorted(c.items())} for c in block] for block in self.curves]

    def record(self, steps):
        # mlp_method and mlp: recorded by every method since the first outputs (report.py reads them).
        return {"mlp_method": "prune", "mlp": [], "allocation": self.run.recipe.allocation, "block_parameter_budget": self.budget,
                "block_parameters": sum(self.shape.parameters(w) for w in self.disp_widths),
                "block_parameters_dense": self.run.num_layers * self.shape.parameters(self.shape.full),
                "blocks": [step["disp"] for step in steps if step.get("disp")],
                **({"error_curves": self._curves_json()} if self.curves else {}),
                **({"learned": {"widths": self.learned["widths"], "history": self.learned["history"]}}
                   if self.run.recipe.allocation == "learned" else {})}
