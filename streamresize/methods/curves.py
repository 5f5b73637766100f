"""Error curves of the dense model, and the widths and head counts chosen from them: for every block, the
error after removing 0, m, 2m, ... MLP neurons (greedy structured OBS with the refit) and, where heads are
ranked too, after each round of query heads; then one budget spent where those errors are least
(`--allocation global`) or one head count for every block (`head_allocation=auto`). A mixin of the slicing
methods: it reads the method's run, options and dense layers. The pure ranking is in allocation.py."""

import json
import logging
import os
import time

import torch

from ..budget import output_parameters, widths_for_target
from ..errors import StreamResizeError
from ..runtime import fault_point
from ..statistics import add_gram_product
from ..writer import atomic_write_json
from .allocation import allocate, global_widths
from .heads import head_curve
from .neurons import OBS_DAMP
from .obs import obs_order
from .options import Option

log = logging.getLogger("streamresize")

CURVE_SAMPLES = Option(16, int, "--allocation global: calibration sequences the per-layer error curves are "
                       "measured on (dense model)", positive=True, recorded=False)
CURVE_SCALE = Option("residual", str, "--allocation global: how layers' errors are compared: residual (the MLP "
                     "output's error per token relative to the residual it is added to), loss (each output channel's "
                     "error weighted by the loss's sensitivity to it, the diagonal Fisher from a backward pass of "
                     "the dense model: the second-order loss increase), absolute, or auto (loss where the family's "
                     "norms come before each sublayer, residual where a norm follows each sublayer, as in Gemma: "
                     "the better of the two measured on each kind)",
                     choices=("residual", "loss", "absolute", "auto"), recorded=False)


def curve_scale_for(family, scale):
    """The scale `auto` stands for on `family`. Measured (BENCHMARKS.md, "gemma3-loss-080"): the loss scale
    wins on SmolLM2 (22.99 against 24.64 at 80 %), the residual scale on Gemma 3 270M, whose post-sublayer
    norms rescale each writer's output (54.05 against 59.08 at 90 %, 114.20 against 132.68 at 80 %)."""
    if scale != "auto":
        return scale
    return "residual" if family.post_norms else "loss"


class CurveAllocation:
    """Per-block widths and head counts from the dense model's error curves (see the module's docstring)."""

    def _curves(self, first, progress):
        """Every block's OBS error curves on the dense model, measured once (saved, so a resumed run
        reuses them)."""
        run, multiple = self.run, self.multiples[1]
        path = run.work_path("mlp-curves.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if first > -1:
            raise StreamResizeError(f"{run.work_dir}: the MLP error curves of this run are missing; rerun with "
                                    "--restart")
        start = time.time()
        saved = {"multiple": multiple, "scale": self.options.get("curve_scale", CURVE_SCALE.default),
                 **self._measure_curves(progress, multiple)}
        atomic_write_json(path, saved)
        log.info("error curves of %d blocks in %.1fs", run.num_layers, time.time() - start)
        return saved

    def _choose_head_count(self, saved, multiple):
        """head_allocation=auto: for each number of head-removal rounds (the same in every block), the MLP
        width --target-size leaves; keep the pair whose summed curve errors are least."""
        run, r, c = self.run, self.run.recipe, self.run.source_config
        full, source = c["intermediate_size"], self.heads_source
        options = []
        for rounds in range(source.rounds + 1):
            kept = source.after(rounds)
            try:
                _, width = widths_for_target(self._head_config(kept), r.target_size, run.reader.parameter_count(),
                                             r.mlp_ratio, self.multiples, False, self.tied_head,
                                             residual_width=run.hidden, adapter=self.head_adapter,
                                             family=run.family)
            except StreamResizeError:
                continue  # no MLP width fits with this many heads
            mlp = sum(_curve_at(curve, (full - width) / multiple) for curve in saved["curves"])
            heads = sum(curve[rounds] for curve in saved["head_curves"])
            options.append((mlp + heads, rounds, kept, width))
        _, _, kept, width = min(options, key=lambda o: o[0])
        log.info("heads and MLP width chosen by the error curves: %s; keeping %d of %d query heads, MLP %d",
                 ", ".join(f"{o[2].heads} heads with MLP {o[3]}: {o[0]:.4g}" for o in options), kept.heads,
                 source.heads, width)
        self.heads_kept = kept
        self.layer_heads = [kept] * run.num_layers
        self.intermediate_sizes = [width] * run.num_layers

    def _allocate_widths(self, first, progress):
        """Per-block MLP widths (with head_allocation=global, head counts too) for the run's budget,
        spread by every block's OBS error curves on the dense model."""
        run, multiple = self.run, self.multiples[1]
        full = run.source_config["intermediate_size"]
        saved = self._curves(first, progress)
        uniform = self.intermediate_sizes
        if self.global_heads:
            self._allocate_jointly(saved["curves"], saved["head_curves"], multiple)
            return
        total = sum(uniform)
        if run.recipe.target_size is not None:
            # Per-block widths need not be equal: spend the whole budget, to one multiple of one block.
            total = max(total, min(full * run.num_layers, self._mlp_neuron_budget() // multiple * multiple))
        self.intermediate_sizes = global_widths(saved["curves"], [full] * run.num_layers, total, multiple)
        log.info("global allocation of MLP widths (uniform %d): %s", uniform[0],
                 " ".join(str(w) for w in self.intermediate_sizes))

    def _allocate_jointly(self, mlp_curves, head_curves, multiple):
        """MLP neuron groups and rounds of attention heads of every block ranked together, by error per
        parameter, until the budget is met: --target-size, or else the uniform widths' total."""
        run, r, c = self.run, self.run.recipe, self.run.source_config
        layers, full, source = run.num_layers, c["intermediate_size"], self.heads_source

        def parameters(config, intermediate):
            return output_parameters(config, run.hidden, intermediate, False, self.tied_head, adapter=self.head_adapter,
                                     family=run.family)

        dense = parameters(c, full)
        keep = (r.target_size * run.reader.parameter_count() if r.target_size is not None
                else parameters(self._head_config(), self.intermediate_sizes[0]))
        head_step = (dense - parameters(self._head_config(source.after(1)), full)) // layers
        mlp_step = (dense - parameters(c, full - multiple)) // layers
        taken = allocate(mlp_curves + head_curves, [mlp_step] * layers + [head_step] * layers, dense - keep,
                         [(full - multiple) // multiple] * layers + [source.rounds] * layers)
        uniform = self.intermediate_sizes[0]
        self.intermediate_sizes = [full - n * multiple for n in taken[:layers]]
        self.layer_heads = [source.after(n) for n in taken[layers:]]
        log.info("global allocation of MLP widths / query heads (uniform %d / %d): %s", uniform,
                 self.heads_kept.heads, " ".join(f"{w}/{h.heads}" for w, h in zip(self.intermediate_sizes,
                                                                                    self.layer_heads)))

    def _mlp_neuron_budget(self):
        """MLP neurons (summed over blocks) that --target-size leaves after everything else is counted."""
        run, r = self.run, self.run.recipe
        config = self._head_config()
        rest = output_parameters(config, self.widths[0], 0, r.basis == "per-point" and r.sparsity > 0,
                                 self.tied_head, adapter=self.head_adapter, family=run.family)
        per_neuron = 3 * self.widths[0]  # a gate row, an up row and a down column
        return int((r.target_size * run.reader.parameter_count() - rest) // per_neuron)

    def _curve_matrix(self, name, n):
        """A zeroed n x n float64 matrix for the curves: a scratch file on the CPU, as in the narrowing."""
        if self.run.device.type == "cpu":
            return self._scratch(name, (n, n))
        return torch.zeros(n, n, dtype=torch.float64, device=self.run.device)

    def _measure_curves(self, progress, multiple):
        """Every block's MLP error after removing 0, m, 2m, ... neurons (greedy OBS with the refit), and
        with head_allocation=global its attention error after 0, 1, ... rounds of heads, on dense inputs
        from the first `curve_samples` sequences. Under the `loss` scale each output channel's error is
        weighted by the loss's sensitivity to it (sensitivity.py), so every error is a loss increase.
        Under the `residual` scale tokens are weighted by
        1/‖r‖² of the residual the sublayer's output joins (after the MLP: the block output; after
        attention: h), so the errors of different layers and sublayers compare. Where a norm follows each
        sublayer (Gemma), it rescales the error with the output: tokens are also weighted by that norm's
        gain ‖norm(m)‖² / ‖m‖² on the writer's output m. Under the loss scale that gain is divided by its
        mean over the tokens: the Fisher at m already holds the norm's average gain, but not which tokens
        it shrinks (a token whose m is huge, as at attention sinks, is nearly free to get wrong)."""
        run, d = self.run, self.run.hidden
        n = min(run.ids.shape[0], int(self.options.get("curve_samples", CURVE_SAMPLES.default)))
        batches = [(a, min(b, n)) for a, b in run.cache.batches(run.recipe.batch_size) if a < n]
        views = [run.cache.view("hidden_a", d), run.cache.view("hidden_b", d)]
        embedding = run.weight(run.family.embedding)
        for rows in batches:
            run.cache.write(views[0], rows, self._embed(embedding, rows))
        views[0].flush()
        del embedding
        curves, head_curves = [], []
        scale = self.options.get("curve_scale", CURVE_SCALE.default)
        relative = scale == "residual"
        post_norms = not run.family.norms_folded
        per_token_gain = post_norms and scale == "loss"  # gains relative to their mean: see the docstring

        def energies(t):
            return t.reshape(-1, t.shape[-1]).double().pow(2).sum(-1, keepdim=True).clamp_min(1e-30)

        def token_weights(residual, added=None, written=None):
            """1/‖residual‖² (relative scale), times the post-sublayer norm's gain ‖added‖² / ‖written‖²."""
            weight = 1.0 / energies(residual) if relative else 1.0
            return weight * (energies(added) / energies(written)) if post_norms else weight

        def block_curves(i):
            """Block i's MLP curve and (with heads ranked) its head curve. A function of its own, so that
            nothing of the block (its dense layer, float64 activations, head Gram: 0.6 GB on the 7B
            shape) is still held while the next block's dense layer is built."""
            layer, down = self._dense_layer(i)
            source, target = views[i % 2], views[(i + 1) % 2]
            width = down.shape[1]
            gram = self._curve_matrix("curve-gram", width)
            heads = None
            if self.global_heads or self.auto_heads:
                w_o = layer.self_attn.o_proj.weight
                heads = {"gram": torch.zeros(w_o.shape[1], w_o.shape[1], dtype=torch.float64, device=run.device)}
                hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda module, args: heads.__setitem__("z", args[0])),
                    layer.self_attn.o_proj.register_forward_hook(
                        lambda module, args, out: heads.__setitem__("o", out))]
            tokens = 0
            weight_sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # MLP, attention
            for rows in batches:
                x = run.cache.read(source, rows, run.device)
                h = layer.attention_residual(x, **self._attention_inputs(i, x))
                a = run.family.mlp_hidden(layer.mlp, layer.mlp_input(h))
                m = layer.mlp.down_proj(a)
                u = layer.mlp_output(m)
                y = h + u
                run.cache.write(target, rows, y)
                a = a.reshape(-1, width).double()
                weight = token_weights(y, u, m)
                add_gram_product(gram, a * weight, a)
                if heads is not None:
                    z = heads.pop("z").reshape(h.numel() // d, -1).double()
                    head_weight = token_weights(h, h - x, heads.pop("o"))
                    add_gram_product(heads["gram"], z * head_weight, z)
                if per_token_gain:
                    weight_sums[0] += weight.sum()
                    weight_sums[1] += head_weight.sum() if heads is not None else 0.0
                tokens += a.shape[0]
                fault_point("accumulating")
            tokens = run.reduce_count(tokens)
            divisors = [tokens, tokens]
            if per_token_gain:  # Σ_t w_t a aᵀ / Σ_t w_t: tokens weighted by their gain over its mean
                divisors = run.reduce_tensors(weight_sums)[0].tolist()
            gram = run.reduce_tensors(gram)[0].div_(divisors[0])
            target.flush()
            steps = (width - multiple) // multiple
            order = obs_order(gram, down, remove=steps * multiple, damp=OBS_DAMP, batch=multiple,
                              row_scale=self._row_scale("mlp", i, "curve_scale"),
                              buffer=self._curve_matrix("obs-inverse", width))
            curve = [order.cost(r * multiple) for r in range(steps + 1)]
            if heads is None:
                return curve, None
            for hook in hooks:
                hook.remove()
            head_gram = run.reduce_tensors(heads["gram"])[0] / divisors[1]
            return curve, head_curve(head_gram, w_o.double(), self.heads_source,
                                     self._row_scale("attention", i, "curve_scale"))

        with torch.no_grad():
            for i in range(run.num_layers):
                progress.set_postfix_str(f"error curves: block {i}")
                curve, heads = block_curves(i)
                curves.append(curve)
                if heads is not None:
                    head_curves.append(heads)
                fault_point("curves")
                log.info("error curves, block %d: MLP %.3g at %d%% of the neurons removed%s", i,
                         curve[len(curve) // 2],
                         100 * (len(curve) // 2) * multiple // run.source_config["intermediate_size"],
                         f", attention {' '.join(f'{e:.3g}' for e in heads[1:])} after each round of "
                         "heads" if heads is not None else "")
        return {"curves": curves, **({"head_curves": head_curves} if head_curves else {})}


def _curve_at(curve, steps):
    """A curve's error after `steps` removal steps, linear between measured steps (a width that is not a
    whole number of steps below the source's), the last step beyond its end."""
    low = min(int(steps), len(curve) - 1)
    high = min(low + 1, len(curve) - 1)
    return curve[low] + (curve[high] - curve[low]) * (steps - int(steps) if high > low else 0.0)
