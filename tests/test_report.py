"""`streamresize report` on finished tiny runs: Markdown always, PNG plots when matplotlib is present."""

import json
import os
import shutil
import sys

import pytest
from helpers import cli, compress_args, read_config

from streamresize.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tiny_model, texts, tmp_path_factory, pca_quarter):
    """Two compressed outputs (with eval results) and the dense model's eval result file."""
    root = tmp_path_factory.mktemp("report")
    outputs = {}
    for name, options in {"dot": {"method": "dotresize", "sparsity": 0.25, "mlp_sparsity": 0.25},
                          "pca": None}.items():
        out = root / name
        if options is None:  # pca at 0.25: the session's shared output, copied (eval writes into it)
            shutil.copytree(pca_quarter.out, out)
        else:
            cli(*compress_args(tiny_model, out, texts["calib"], **options))
        cli("eval", out, "--dataset", texts["heldout"], "--max-seq-length", 32, "--num-samples", 4)
        outputs[name] = out
    dense = root / "dense.json"
    cli("eval", tiny_model, "--dataset", texts["heldout"], "--max-seq-length", 32, "--num-samples", 4,
        "--output", dense)
    return outputs, dense


def _table_rows(markdown, heading):
    """Cells of the data rows of the table under `heading` (up to the next heading)."""
    section = markdown.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_report_of_one_output(finished, tmp_path):
    outputs, _ = finished
    r = cli("report", outputs["dot"], "-o", tmp_path / "rep")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    config = read_config(outputs["dot"])
    points = _table_rows(markdown, "### Per point")
    assert [int(p[0]) for p in points] == list(range(len(config["residual_widths"])))
    assert [int(p[2]) for p in points] == config["residual_widths"]
    blocks = _table_rows(markdown, "### Per block")
    assert len(blocks) == config["num_hidden_layers"]
    assert [int(b[4]) for b in blocks] == config["intermediate_sizes"]  # block, 3 residual widths, MLP width
    assert "perplexity" in markdown and "dotresize" in markdown
    assert json.loads(r.stdout.strip().splitlines()[-1])["report"].endswith("report.md")
    pngs = [f for f in os.listdir(tmp_path / "rep") if f.endswith(".png")]
    if not _has_matplotlib():
        assert pngs == [] and "text only" in markdown
        return
    assert {"dot-widths.png", "dot-errors.png", "dot-time.png"} <= set(pngs)
    for png in pngs:
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert f"]({png})" in markdown


def test_comparison_across_outputs(finished, tmp_path):
    outputs, dense = finished
    write_report([str(outputs["dot"]), str(outputs["pca"]), str(dense)], str(tmp_path))
    markdown = (tmp_path / "report.md").read_text()
    rows = {row[0]: row for row in _table_rows(markdown, "## Comparison")}
    assert set(rows) == {"dot", "pca", "dense"}
    assert (rows["dot"][1], rows["pca"][1], rows["dense"][1]) == ("dotresize", "pca", "dense")
    for name, out in outputs.items():
        measured = json.loads((out / "streamresize_eval.json").read_text())
        assert rows[name][2] == f"{measured['parameters']:,}"
    if _has_matplotlib():
        assert (tmp_path / "perplexity-vs-parameters.png").stat().st_size > 1000


def test_text_only_without_matplotlib(finished, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    outputs, _ = finished
    write_report([str(outputs["pca"])], str(tmp_path))
    assert os.listdir(tmp_path) == ["report.md"]
    assert "text only" in (tmp_path / "report.md").read_text()


def test_other_records_and_missing_run_log(finished, tmp_path):
    """A method that records other statistics (per-block kept fractions, no PCA bound) and an output
    without its run log still get a report with their numbers."""
    outputs, _ = finished
    out = tmp_path / "other"
    shutil.copytree(outputs["pca"], out)
    os.remove(out / "streamresize_run.json")
    config = read_config(out)
    info = config["streamresize"]
    info["method"] = "other"
    info["points"] = [{"point": p["point"], "width": p["width"], "kept_fraction": 0.5} for p in info["points"]]
    info["blocks"] = [{"block": i, "heads_kept": 3 + i} for i in range(config["num_hidden_layers"])]
    (out / "config.json").write_text(json.dumps(config))
    write_report([str(out)], str(tmp_path / "rep"))
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "kept_fraction" in markdown and "### blocks" in markdown
    assert [int(r[1]) for r in _table_rows(markdown, "### blocks")] == [3 + i for i in range(config["num_hidden_layers"])]
    # The eval result was measured on the original config.json, so it is not shown for the edited one.
    assert "perplexity" not in markdown


def test_report_errors_name_the_input(tmp_path):
    r = cli("report", tmp_path, check=False)
    assert r.returncode == 2 and str(tmp_path / "config.json") in r.stderr
