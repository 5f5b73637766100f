"""Structured OBS against brute force on small random problems (issue 12)."""

import itertools

import pytest
import torch

from streamresize.methods.obs import obs_order, refit


def problem(n, out=5, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    return x.T @ x / tokens, w


def lstsq_error(gram, weight, keep):
    """Output error of the best refit on the kept columns, by direct least squares."""
    if not keep:
        return float(torch.einsum("oi,ij,oj->", weight, gram, weight))
    fitted = torch.zeros_like(weight)
    fitted[:, keep] = refit(gram, weight, keep)
    diff = weight - fitted
    return float(torch.einsum("oi,ij,oj->", diff, gram, diff))


def columns(groups, size):
    return [g * size + j for g in groups for j in range(size)]


@pytest.mark.parametrize("group", [1, 2])
def test_greedy_step_is_the_best_single_removal_and_error_is_the_refit_optimum(group):
    n_groups = 6
    gram, weight = problem(n_groups * group, seed=group)
    order = obs_order(gram, weight, group=group, damp=1e-12)
    alive = list(range(n_groups))
    for step, g in enumerate(order.removed):
        costs = {c: lstsq_error(gram, weight, columns([a for a in alive if a != c], group)) for c in alive}
        assert costs[g] == pytest.approx(min(costs.values()), rel=1e-6)
        alive.remove(g)
        assert order.errors[step] == pytest.approx(lstsq_error(gram, weight, columns(alive, group)), rel=1e-6)


def test_batched_removal_error_is_the_refit_optimum_of_what_it_kept():
    gram, weight = problem(12, seed=3)
    order = obs_order(gram, weight, remove=8, batch=3, damp=1e-12)
    assert len(order.removed) == 8 and len(set(order.removed)) == 8
    kept = order.kept(12, 8)
    assert order.errors[-1] == pytest.approx(lstsq_error(gram, weight, kept), rel=1e-6)


def test_greedy_is_exact_for_one_removal_and_never_below_the_exhaustive_optimum():
    for seed in range(5):
        gram, weight = problem(8, seed=seed)
        order = obs_order(gram, weight, remove=4, damp=1e-12)
        for m in (1, 4):
            best = min(lstsq_error(gram, weight, list(k)) for k in itertools.combinations(range(8), 8 - m))
            assert order.errors[m - 1] >= best * (1 - 1e-9)
            if m == 1:
                assert order.errors[0] == pytest.approx(best, rel=1e-9)


def test_rounds_remove_one_group_from_every_set_per_update():
    gram, weight = problem(12, seed=7)
    sets = [{0, 1, 2}, {3, 4, 5}]  # six heads of width 2, two KV groups
    order = obs_order(gram, weight, group=2, remove=4, rounds=sets, damp=1e-12)
    assert sorted(len(s & set(order.removed)) for s in sets) == [2, 2]
    kept = order.kept(6, 4)
    assert order.errors[-1] == pytest.approx(lstsq_error(gram, weight, columns(kept, 2)), rel=1e-6)


def test_dead_inputs_are_removed_first_at_no_cost():
    gram, weight = problem(6, seed=9)
    gram[2] = 0
    gram[:, 2] = 0
    order = obs_order(gram, weight, remove=1)
    assert order.removed == [2] and order.errors[0] < 1e-2 * order.total  # only the damping's share


def test_global_allocation_spends_the_budget_where_it_costs_least():
    from streamresize.methods.allocation import global_widths
    cheap = [0, 1, 2, 3, 4]          # error after removing 0..4 steps of 8 neurons
    dear = [0, 10, 20, 30, 40]
    widths = global_widths([cheap, dear], [32, 32], keep_total=40, multiple=8)
    assert widths == [8, 32]          # all three steps from the cheap layer; it keeps one multiple
    widths = global_widths([cheap, dear], [32, 32], keep_total=24, multiple=8)
    assert widths == [8, 16] and sum(widths) == 24


def test_global_allocation_equals_brute_force_on_convex_curves():
    from streamresize.methods.allocation import global_widths
    curves = [[0, 1, 3, 6, 10], [0, 1.2, 2.7, 4.7, 7.2], [0, 0.5, 4, 9, 16]]
    for keep in (88, 80, 72, 64):
        widths = global_widths(curves, [32, 32, 32], keep, 8, min_width=0)
        cost = sum(c[(32 - w) // 8] for c, w in zip(curves, widths))
        best = min(sum(c[r] for c, r in zip(curves, rs))
                   for rs in itertools.product(range(5), repeat=3) if sum(rs) == (96 - keep) // 8)
        assert sum(widths) == keep and cost == pytest.approx(best)


def test_auto_width_multiples_are_gpu_friendly_and_256_for_decilm():
    from streamresize.errors import StreamResizeError
    from streamresize.methods import width_multiples
    assert width_multiples("auto", 576, 1536) == (32, 64)          # SmolLM2-135M
    assert width_multiples("auto", 4096, 11008) == (128, 128)      # Llama-2-7B
    assert width_multiples("auto", 64, 96) == (8, 8)               # too narrow for coarser steps
    assert width_multiples("auto", 4096, 11008, "decilm") == (128, 256)
    assert width_multiples(16, 576, 1536) == (16, 16)
    # Uniform widths: one step in every block costs at most 1 % of the parameters, so --target-size lands
    # within 1 % (one neuron in all blocks: SmolLM2 30 x 1728 of 134.5 M, Llama-2-7B 32 x 12288 of 6.74 G,
    # Gemma 3 270M 18 x 1920 of 268.1 M).
    assert width_multiples("auto", 576, 1536, mlp_unit_share=30 * 1728 / 134_515_008) == (32, 16)
    assert width_multiples("auto", 4096, 11008, mlp_unit_share=32 * 12288 / 6_738_415_616) == (128, 128)
    assert width_multiples("auto", 640, 2048, mlp_unit_share=18 * 1920 / 268_098_176) == (32, 64)
    assert width_multiples("auto", 576, 1536, "decilm", mlp_unit_share=1.0) == (32, 256)
    with pytest.raises(StreamResizeError, match="--width-multiple 64 with --save-format decilm"):
        width_multiples(64, 576, 1536, "decilm")


def test_target_size_is_met_within_one_multiple_with_auto_multiples():
    from streamresize.budget import output_parameters, widths_for_target
    config = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3}
    source = output_parameters(config, 576, 1536, False, True) - 576 * 576  # tied: no adapter in the source
    for target in (0.9, 0.8, 0.7):
        width, ff = widths_for_target(config, target, source, "fill", (32, 64), False, True, residual_width=576)
        got = output_parameters(config, width, ff, False, True)
        one_more = output_parameters(config, width, ff + 64, False, True)
        assert ff % 64 == 0 and got <= target * source < one_more


def test_the_memory_lean_solve_equals_the_direct_formulas(tmp_path):
    """The in-place LAPACK inverse in a memory-mapped buffer, the refit and the output errors built in
    blocks of rows and columns: the same numbers as the formulas written out whole."""
    from streamresize.methods.neurons import output_error, refit_kept
    from streamresize.methods.obs import damped_inverse, energy
    from streamresize.statistics import scratch_matrix

    gram, w = problem(13, out=7, tokens=60, seed=4)
    buffer = scratch_matrix(str(tmp_path / "inverse.f64"), (13, 13))
    inverse = damped_inverse(gram, 0.01, out=buffer)
    assert inverse.data_ptr() == buffer.data_ptr()  # built in the buffer itself
    expected = torch.linalg.inv(gram + 0.01 * gram.diagonal().mean() * torch.eye(13, dtype=gram.dtype))
    assert torch.allclose(inverse, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(inverse, inverse.T)

    keep = torch.tensor([0, 2, 3, 7, 8, 11, 12])
    direct = w @ gram[:, keep] @ torch.linalg.inv(gram[keep][:, keep])
    assert torch.allclose(refit_kept(gram, w.float(), keep, rows=3), direct, rtol=1e-5, atol=1e-6)
    assert torch.allclose(refit_kept(gram, w, keep, rows=3), refit(gram, w, keep.tolist()), rtol=1e-7, atol=1e-9)

    assert energy(w, gram, rows=2) == pytest.approx(float(torch.trace(w @ gram @ w.T)), rel=1e-12)
    merged = direct + 0.1
    for kept in (merged, None):  # a refit, and plain pruning (the kept columns as they are)
        diff = w.clone()  # removed columns: all of their output is lost
        diff[:, keep] = w[:, keep] - kept if kept is not None else 0.0
        want = (torch.trace(diff @ gram @ diff.T) / torch.trace(w @ gram @ w.T)).sqrt()
        before = w.clone()
        assert output_error(gram, w, keep, kept, rows=2) == pytest.approx(float(want), rel=1e-10)
        assert torch.equal(w, before)  # the caller's down_proj is not changed


def test_a_singular_slightly_indefinite_gram_is_solved_with_a_larger_ridge_and_a_warning(caplog):
    """Fewer tokens than neurons make H singular; float32 products can push its zero eigenvalues a little
    below zero. The refit then raises its ridge (logged) instead of stopping; a matrix far from positive
    definite is still refused."""
    from streamresize.errors import StreamResizeError
    from streamresize.methods.neurons import refit_kept

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64)  # 6 tokens, 10 neurons: rank 6
    gram = x.T @ x
    gram -= 1e-7 * gram.diagonal().mean() * torch.eye(10, dtype=gram.dtype)  # eigenvalues of -1e-7 x mean
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    keep = torch.arange(8)
    with caplog.at_level("WARNING", logger="streamresize"):
        fitted = refit_kept(gram, w, keep)
    assert torch.isfinite(fitted).all() and fitted.shape == (3, 8)
    assert "retrying with 1e-06" in caplog.text
    with pytest.raises(StreamResizeError, match="not positive definite"):
        refit_kept(-torch.eye(10, dtype=torch.float64), w, keep)


def test_whole_kv_group_removal_takes_the_group_that_costs_least():
    """head_unit=kv_group: 3 KV groups of 2 query heads (head_dim 2); one round must remove the group
    whose removal, the rest refitted, costs least (of the three), its KV head with it, and leave that
    error."""
    from streamresize.methods.heads import HeadLayout, select_heads

    gram, w_o = problem(12, out=5, tokens=80, seed=4)
    layout = HeadLayout(6, 3, 2, by_group=True)
    kept = layout.after(1)
    assert (kept.heads, kept.kv_heads, layout.rounds) == (4, 2, 2)
    heads, kv, merged, info = select_heads(gram, w_o, layout, kept)
    errors = {g: lstsq_error(gram, w_o, columns([k for k in range(3) if k != g], 4)) for g in range(3)}
    gone = min(errors, key=errors.get)
    assert max(errors.values()) > 1.01 * errors[gone]  # a real choice
    assert kv == [k for k in range(3) if k != gone] and heads == [h for h in range(6) if h // 2 != gone]
    fitted = torch.zeros_like(w_o)
    fitted[:, columns(heads, 2)] = merged
    diff = w_o - fitted
    assert float(torch.einsum("oi,ij,oj->", diff, gram, diff)) == pytest.approx(errors[gone], rel=1e-6)
    with pytest.raises(Exception, match="by removing whole KV groups"):
        select_heads(gram, w_o, layout, HeadLayout(3, 3, 2))  # one query head per group: not this unit
