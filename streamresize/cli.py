"""Command line: `streamresize compress`, `streamresize plan` and `streamresize eval`."""

import argparse
import json
import logging
import sys

from .errors import StreamResizeError

log = logging.getLogger("streamresize")


def _compress_parser(sub):
    p = sub.add_parser("compress", help="narrow a checkpoint one decoder block at a time",
                       description="Compress MODEL_DIR (sharded safetensors) into OUT_DIR, streaming one block at a time.")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    _run_options(p)
    p.add_argument("--restart", action="store_true", help="discard an earlier unfinished run and start over")


def _plan_parser(sub):
    p = sub.add_parser("plan", help="memory, disk and time a compression will need, before loading any weight",
                       description="Print per step the bytes read, activation cache, micro-batch and statistics "
                                   "memory, the placement, the disk needed for OUT_DIR and the work dir (checked "
                                   "against free space) and a time estimate from this device's measured "
                                   "throughput; takes the same options as compress. The last line is JSON.")
    p.add_argument("model_dir")
    p.add_argument("out_dir", nargs="?", help="where the output would go (default: MODEL_DIR's name + "
                                              "'-streamresize' in the current directory)")
    _run_options(p)


def _run_options(p):
    p.add_argument("--recipe", help="YAML recipe (configs/*.yaml); options given here override it")
    p.add_argument("--method", help="width method: pca (SliceGPT-style rotate-and-slice), prune (keep the "
                                    "support, drop the rest), dotresize (merge the rest back by optimal transport)")
    p.add_argument("--sparsity", type=float, help="fraction of the residual width removed (SliceGPT's meaning)")
    p.add_argument("--mlp-sparsity", type=float, help="fraction of MLP intermediate neurons removed (default 0)")
    p.add_argument("--target-size", type=float,
                   help="fraction of the source's total parameters to keep (tied tensors once); picks "
                        "--sparsity and --mlp-sparsity, mixed by --mlp-ratio")
    p.add_argument("--mlp-ratio", type=lambda v: v if v == "fill" else float(v),
                   help="with --target-size: MLP sparsity / residual sparsity (default 1), or 'fill': the "
                        "residual keeps --sparsity and the MLP width meets the budget")
    p.add_argument("--mlp-method", choices=["auto", "prune", "dotresize"],
                   help="how MLP neurons are removed (auto: dotresize merges, other methods prune)")
    p.add_argument("--basis", choices=["per-point", "shared"],
                   help="per-point: a basis fitted at every point on the compressed prefix, with skip-path "
                        "matrices between points; shared: one basis for all points from a first pass over the "
                        "dense model, no skip-path matrices (fewer parameters)")
    p.add_argument("--head", choices=["auto", "tied", "untied"],
                   help="tied: keep a tied embedding tied, the head reads through a small k x k adapter; "
                        "untied: a separate narrowed head (auto: untied for pca, tied otherwise)")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", default=[],
                   help="method option, repeatable: support=norm|variance|mean_abs|pca, "
                        "cost=sqeuclidean|correlation, normalize=true, epsilon=0.05, marginals=uniform|energy, "
                        "solver=auto|sinkhorn|sinkhorn_log|sinkhorn_stabilized|emd, reader=pinv|lstsq, mlp_reader=ot|lstsq")
    p.add_argument("--dataset", nargs="+", help="calibration text: local .txt (documents split at blank lines) "
                                                "or .jsonl (a 'text' field per line); or 'random' / 'random:SEED': "
                                                "uniform random token ids, no tokenizer needed (for measuring runs)")
    p.add_argument("--num-calibration-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--max-seq-length", type=int, help="tokens per calibration sequence (default 2048)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, help="seed for sampling calibration windows (default 0)")
    p.add_argument("--width-multiple", type=int, help="round kept widths down to a multiple of this (default 8)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="output dtype (default: the input's)")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the block's own computation; statistics are always float64 (default: "
                        "bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--work-dir", help="scratch directory (default: OUT_DIR.streamresize-work beside the output)")
    p.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="GPU memory the run may use, e.g. 20GiB or 12GB (default: the GPU's total); sets the "
                        "micro-batch and whether the activation cache fits on the GPU")
    p.add_argument("--max-cpu-memory", metavar="SIZE",
                   help="RAM the run may use, e.g. 3GiB (default: 80%% of RAM); on the CPU sets the micro-batch, "
                        "and decides whether the activation cache and the prefetched block are kept in RAM")
    p.add_argument("--cache-location", choices=["auto", "device", "pinned", "disk"], default="auto",
                   help="where the activation cache lives: the compute device's memory, pinned host memory "
                        "(GPU runs), or memory-mapped files (default auto: the fastest that fits the budgets)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read each block's tensors when needed, not in a background thread during the previous block")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint",
                       description="Perplexity of MODEL_DIR on local text in non-overlapping windows; "
                                   "the last line printed is JSON.")
    p.add_argument("model_dir")
    p.add_argument("--dataset", nargs="+", required=True, help="local .txt or .jsonl evaluation text")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--num-samples", type=int, help="evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")


RECIPE_OPTIONS = ("method", "sparsity", "mlp_sparsity", "target_size", "mlp_ratio", "mlp_method", "basis", "head", "dataset", "num_calibration_samples", "max_seq_length", "batch_size",
                  "device", "seed", "width_multiple", "dtype", "compute_dtype")


def parse_options(pairs):
    """KEY=VALUE strings to a dict, values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise StreamResizeError(f"--option {pair}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


def _recipe_and_memory(args):
    from .placement import MemoryOptions
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, {k: getattr(args, k) for k in RECIPE_OPTIONS}, parse_options(args.option))
    memory = MemoryOptions(max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
                           cache_location=args.cache_location, prefetch=not args.no_prefetch)
    return recipe, memory


def run_compress(args):
    from .engine import compress

    recipe, memory = _recipe_and_memory(args)
    log.info("compressing %s -> %s with %s", args.model_dir, args.out_dir, recipe.resolved())
    return compress(args.model_dir, args.out_dir, recipe, work_dir=args.work_dir, restart=args.restart, memory=memory)


def run_plan(args):
    import os

    from .engine import StreamingCompressor
    from .plan import check_disk, format_plan, make_plan

    recipe, memory = _recipe_and_memory(args)
    out_dir = args.out_dir or os.path.join(os.getcwd(), os.path.basename(os.path.abspath(args.model_dir)) + "-streamresize")
    compressor = StreamingCompressor(args.model_dir, out_dir, recipe, work_dir=args.work_dir, memory=memory)
    plan = make_plan(compressor, measure=True)
    print(format_plan(plan, compressor), flush=True)
    check_disk(plan)
    return plan.as_dict()


def run_eval(args):
    from .engine import resolve_device
    from .evaluate import evaluate

    return evaluate(args.model_dir, args.dataset, args.max_seq_length, args.num_samples, args.batch_size,
                    resolve_device(args.device))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="streamresize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _plan_parser(sub)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    commands = {"compress": run_compress, "plan": run_plan, "eval": run_eval}
    try:
        result = commands[args.command](args)
    except StreamResizeError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return 130
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
