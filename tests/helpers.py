"""Shared test helpers: run the CLI, load outputs where streamresize cannot be imported, hash trees.

Speed: `cli` runs `streamresize.cli.main` in the test process (no interpreter start, no second import
of torch, transformers and POT). A test that needs a separate process (one killed by
STREAMRESIZE_CRASH_AT, or one where streamresize must not be importable) gets it from a fork server
that imported the heavy libraries once (`separate_process`), so each such process starts in well under a
second instead of ten.
"""

import contextlib
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
import warnings

import numpy as np
import torch

CALIB = {"num_calibration_samples": 12, "max_seq_length": 32, "batch_size": 5}

# What a fresh process's fork server imports once: the expensive part of starting `python -m streamresize`
# or the stock-transformers loader below. Nothing here may import streamresize (see _blocked_load).
PRELOAD = ["numpy", "torch", "safetensors.torch", "transformers", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama",
           "transformers.models.mistral.modeling_mistral", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.qwen3.modeling_qwen3", "transformers.models.phi3.modeling_phi3",
           "transformers.models.gemma2.modeling_gemma2", "transformers.models.gemma3.modeling_gemma3", "ot", "yaml",
           "tqdm"]
HF_ENV = {"HF_HUB_OFFLINE": "1"}


# ---- separate processes ---------------------------------------------------------------------------

_context = None


def process_context():
    """The multiprocessing context whose fork server has the heavy libraries imported (started once)."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def start_fork_server():
    """Start the fork server now (its imports run beside whatever the tests do next)."""
    from multiprocessing import forkserver

    process_context()
    forkserver.ensure_running()


def _exit_status(e):
    """The status a process exits with on SystemExit(e.code), printing a message as the interpreter does."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _child(target, args, env, stdout_path, stderr_path):
    """Runs in the forked process: output to files, the environment set, `target(*args)` as the program."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 1
    try:
        code = target(*args)
    except SystemExit as e:
        code = _exit_status(e)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)


def separate_process(target, *args, env=None, timeout=600):
    """Run `target(*args)` (a module-level function) in a separate, freshly forked process; its return
    value is the exit status. It gets this process's environment as it is now (with HF_HUB_OFFLINE=1),
    updated by `env`.
    Returns a CompletedProcess with what it wrote to stdout and stderr."""
    ctx = process_context()
    with tempfile.TemporaryDirectory(prefix="streamresize-test-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        p = ctx.Process(target=_child, args=(target, args, {**os.environ, **HF_ENV, **(env or {})}, out, err))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise AssertionError(f"{getattr(target, '__name__', target)}{args} did not finish in {timeout} s")
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess([str(a) for a in args], p.exitcode, f.read(), g.read())


def _cli_main(argv):
    from streamresize.cli import main

    return main(argv)


def _run_script(path, argv):
    import runpy

    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python PATH` has it
    runpy.run_path(path, run_name="__main__")
    return 0


def run_script(path, *args, check=True):
    """`python PATH ARGS` in a separate process (a script run as a program, its imports already warm)."""
    result = separate_process(_run_script, str(path), [str(a) for a in args])
    if check and result.returncode != 0:
        raise AssertionError(f"{path} {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def cli_process(*args, env=None, check=True):
    """`streamresize ARGS` in a separate process (for runs that are killed: STREAMRESIZE_CRASH_AT)."""
    result = separate_process(_cli_main, [str(a) for a in args], env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"streamresize {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


# ---- the CLI in this process ------------------------------------------------------------------------

def _run_main(argv):
    """streamresize.cli.main(argv) here, with stdout, stderr, its log and warnings captured as a separate
    process would show them. An exception main does not handle is a traceback and status 1, as there."""
    from streamresize.cli import main

    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("streamresize")
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    saved_level, saved_root = logger.level, list(root.handlers)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: usage errors, --help
                code = _exit_status(e)
            except Exception:
                traceback.print_exc()
                code = 1
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        for h in list(root.handlers):  # main's logging.basicConfig must not outlive the call
            if h not in saved_root:
                root.removeHandler(h)
    return code, out.getvalue(), err.getvalue()


def cli(*args, env=None, check=True):
    """`streamresize ARGS`: in this process (streamresize.cli.main), or with `env` (environment variables
    for the run, e.g. STREAMRESIZE_CRASH_AT) in a separate process."""
    if env:
        return cli_process(*args, env=env, check=check)
    argv = [str(a) for a in args]
    code, stdout, stderr = _run_main(argv)
    result = subprocess.CompletedProcess(["streamresize", *argv], code, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"streamresize {' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
    return result


def compress_args(model, out, dataset, **options):
    opts = {**CALIB, **options}
    args = ["compress", model, out, "--dataset", dataset]
    for k, v in opts.items():
        for value in v if isinstance(v, list) else [v]:
            args += [f"--{k.replace('_', '-')}", value]
    return args


# ---- loading outputs without streamresize -------------------------------------------------------------

def _blocked_load(model_dir, ids_path, out_path):
    """In a separate process: stock transformers (trust_remote_code) with streamresize made unimportable."""
    class BlockStreamresize:
        def find_spec(self, name, path=None, target=None):
            if name == "streamresize" or name.startswith("streamresize."):
                raise ImportError("streamresize is blocked in this process")

    sys.meta_path.insert(0, BlockStreamresize())
    try:
        import streamresize  # noqa: F401
        sys.exit("streamresize was importable")
    except ImportError:
        pass
    assert not any(m == "streamresize" or m.startswith("streamresize.") for m in sys.modules), "streamresize loaded"
    from transformers import AutoModelForCausalLM

    os.chdir(os.path.dirname(out_path))
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(ids_path))).logits
    np.save(out_path, logits.float().numpy())
    return 0


def logits_without_streamresize(model_dir, ids, tmp_path):
    """Logits from stock transformers (trust_remote_code) in a process where streamresize cannot be imported."""
    ids_path, out_path = tmp_path / "ids.npy", tmp_path / "logits.npy"
    np.save(ids_path, ids.numpy())
    result = separate_process(_blocked_load, str(model_dir), str(ids_path), str(out_path))
    assert result.returncode == 0, result.stderr
    return torch.from_numpy(np.load(out_path))


def dense_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def tree_digest(path, exclude=()):
    """{relative path: sha256} of every file under path."""
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel in exclude:
                continue
            with open(full, "rb") as f:
                digests[rel] = hashlib.sha256(f.read()).hexdigest()
    return digests


def read_config(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def output_weights(out):
    """Every tensor of an output directory's shards, by name."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        weights.update(load_file(shard))
    return weights


# The first lines of a script that loads an output where streamresize cannot be imported (what a user
# without it has): any import of it raises.
BLOCK_STREAMRESIZE = """import sys
class BlockStreamresize:
    def find_spec(self, name, path=None, target=None):
        if name == "streamresize" or name.startswith("streamresize."):
            raise ImportError("streamresize is blocked in this process")
sys.meta_path.insert(0, BlockStreamresize())
"""
