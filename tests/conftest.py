import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub; the CLI runs in-process
# Every tensor in these tests is tiny: a second intra-op thread only adds synchronisation, and on a busy
# machine its spin-waiting made runs 10-30x slower (a 4-block compress: 5.5 s with two threads, 0.7 s with
# one). One thread here and, through the environment, in every process a test starts, so runs compared
# byte for byte compute alike. Set OMP_NUM_THREADS to test with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file

sys.path.insert(0, os.path.dirname(__file__))
from helpers import cli, compress_args, start_fork_server, tree_digest  # noqa: E402
from tiny import make_text, make_tiny_llama, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fork_server():
    """Separate processes (crash tests, loading without streamresize) fork from a server that imported
    torch and transformers once; start it now so that its imports overlap the first tests."""
    start_fork_server()


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return {"calib": make_text(str(d / "calib.txt"), 200, seed=1), "heldout": make_text(str(d / "heldout.txt"), 80, seed=2)}


@pytest.fixture(scope="session")
def tokenizer(texts):
    return make_tokenizer(texts["calib"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-fp32")), tokenizer)


@pytest.fixture(scope="session")
def tiny_model_bf16(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-bf16")), tokenizer, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory, tokenizer):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-tied")), tokenizer, tie=True, seed=3)


@pytest.fixture(scope="session")
def pca_quarter(tiny_model, texts, tmp_path_factory):
    """The reference output `streamresize compress tiny_model --sparsity 0.25` (pca, the CALIB sizes, every
    other option at its default), compressed once for the session: what crashed-and-resumed runs and
    runs with other memory options must reproduce byte for byte, and what tests that only read an output
    read. Treat it as read-only: copy it (shutil.copytree) before writing into it.

    out: the output; result: the run's CompletedProcess (stdout, stderr); input_digest: tree_digest of
    tiny_model taken just before the run."""
    out = tmp_path_factory.mktemp("pca-quarter") / "out"
    before = tree_digest(tiny_model)
    result = cli(*compress_args(tiny_model, out, texts["calib"], sparsity=0.25))
    written = tree_digest(out)
    yield SimpleNamespace(out=out, result=result, input_digest=before)
    assert tree_digest(out) == written, "a test wrote into the shared pca_quarter output; copy it first"
