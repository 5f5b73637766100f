"""`--statistics-products`: each micro-batch's Gram product in float32, summed in float64 (issue 12,
item 6): what a consumer GPU is fast at, and within float32 rounding of the exact sums."""

import json

import torch

import streamresize
from helpers import CALIB, dense_logits
from streamresize.precision import resolve_statistics_products
from streamresize.statistics import Moments, add_gram_product, gram_product, products, scratch_matrix

RUN_LOG = "streamresize_run.json"


def _gram(x, dtype):
    stats = Moments(x.shape[-1], "cpu")
    with products(dtype):
        for part in x.split(256):
            stats.add(part)
    return stats.gram


def test_gram_products_add_into_a_file_backed_matrix_in_place(tmp_path):
    """add_gram_product writes xᵀ y into `out` itself (a memory-mapped scratch file for a 7B MLP's d_ff²
    Gram, so no n x n temporary lands in anonymous memory) and equals out + gram_product in both product
    precisions."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 40, generator=g), torch.randn(300, 40, generator=g)
    for dtype in (torch.float64, torch.float32):
        out = scratch_matrix(str(tmp_path / f"gram-{dtype}.f64"), (40, 40))
        start = torch.randn(40, 40, generator=g, dtype=torch.float64)
        out.copy_(start)
        pointer = out.data_ptr()
        with products(dtype):
            result = add_gram_product(out, x, y)
            expected = start + gram_product(x, y)
        assert result.data_ptr() == pointer and out.data_ptr() == pointer
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-10)


def test_float32_products_are_summed_in_float64_within_float32_rounding():
    x = torch.randn(4096, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 48)
    exact = x.double().T @ x.double()
    g64, g32 = _gram(x, torch.float64), _gram(x, torch.float32)
    assert g32.dtype == torch.float64
    assert torch.allclose(g64, exact, rtol=1e-12, atol=1e-9)
    scale = exact.diagonal().sqrt()
    relative = (g32 - exact).abs() / torch.outer(scale, scale)
    assert 0 < relative.max() < 1e-5  # rounded (so the switch took effect), but only by float32 rounding
    # products() is scoped: outside it the exact path is back.
    assert torch.equal(_gram(x, torch.float64), g64)


def test_auto_is_float32_on_a_gpu_and_float64_on_the_cpu():
    assert resolve_statistics_products("auto", torch.device("cuda")) == torch.float32
    assert resolve_statistics_products("auto", torch.device("cpu")) == torch.float64
    assert resolve_statistics_products("float32", torch.device("cpu")) == torch.float32


def test_a_run_with_float32_products_matches_the_exact_one_closely(tiny_model, texts, tmp_path):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in ("float64", "float32"):
        out = tmp_path / name
        streamresize.compress(tiny_model, str(out), dataset=[texts["calib"]], **CALIB, method="dotresize",
                              sparsity=0.0, mlp_sparsity=0.5, width_multiple=8, statistics_products=name,
                              method_options={"mlp_support": "obs", "mlp_reader": "lstsq"})
        assert json.load(open(out / RUN_LOG))["statistics_products"] == name
        with torch.no_grad():
            logits[name] = streamresize.load(str(out))(ids).logits
    dense = dense_logits(tiny_model, ids)
    gap = (logits["float32"] - logits["float64"]).norm() / (logits["float64"] - dense).norm()
    assert gap < 0.05, float(gap)  # far below the compression's own error
