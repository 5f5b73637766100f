"""Shared test helpers: run the CLI, load outputs where streamresize cannot be imported, hash trees."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

CALIB = {"num_calibration_samples": 12, "max_seq_length": 32, "batch_size": 5}


def cli(*args, env=None, check=True):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "streamresize", *map(str, args)], capture_output=True,
                            text=True, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"streamresize {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def compress_args(model, out, dataset, **options):
    opts = {**CALIB, **options}
    args = ["compress", model, out, "--dataset", dataset]
    for k, v in opts.items():
        for value in v if isinstance(v, list) else [v]:
            args += [f"--{k.replace('_', '-')}", value]
    return args


BLOCKED_LOAD = textwrap.dedent('''
    import sys
    class BlockStreamresize:
        def find_spec(self, name, path=None, target=None):
            if name == "streamresize" or name.startswith("streamresize."):
                raise ImportError("streamresize is blocked in this process")
    sys.meta_path.insert(0, BlockStreamresize())
    try:
        import streamresize
        sys.exit("streamresize was importable")
    except ImportError:
        pass
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    model_dir, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(ids_path))).logits
    np.save(out_path, logits.float().numpy())
''')


def logits_without_streamresize(model_dir, ids, tmp_path):
    """Logits from stock transformers (trust_remote_code) in a process where streamresize cannot be imported."""
    ids_path, out_path = tmp_path / "ids.npy", tmp_path / "logits.npy"
    np.save(ids_path, ids.numpy())
    result = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(model_dir), str(ids_path), str(out_path)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            cwd=str(tmp_path))
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
