"""Command line: `streamresize compress`, `plan`, `eval` and `report`."""

import argparse
import errno
import json
import logging
import os
import sys

from .errors import StreamResizeError
from .runtime import EXIT_RESUMABLE, Preempted

log = logging.getLogger("streamresize")
# formats.FORMATS, spelled out here so that parsing arguments imports no torch (a test checks they agree)
FORMAT_CHOICES = ("auto", "stock", "decilm", "bundled")

EXIT_CODES = f"""exit status:
  0   done (also when OUT_DIR already holds the finished output of the same command)
  2   bad input, options or state, or a full disk: the message names the file or option and what to
      do (--debug shows the traceback); nothing incomplete is ever marked complete
  {EXIT_RESUMABLE}  stopped by SIGTERM, SIGINT or SIGUSR1 (EXIT_RESUMABLE): the run stops at the next step
      boundary (a second signal: at once); rerun the same command to resume, so a scheduler may
      requeue the job on this status
  1   an unexpected error (a bug: the traceback is printed)"""


def _compress_parser(sub):
    p = sub.add_parser("compress", help="narrow a checkpoint one decoder block at a time",
                       description="Compress MODEL_DIR (sharded safetensors) into OUT_DIR, streaming one block at a time.",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    _run_options(p)
    p.add_argument("--restart", action="store_true",
                   help="discard an earlier unfinished run and start over (a finished streamresize output in "
                        "OUT_DIR is replaced once the new one is complete)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT_DIR may hold other files: they are replaced, once the new output is complete")
    p.add_argument("--save-format", choices=FORMAT_CHOICES, default="auto",
                   help="auto (default): the source's own architecture (LlamaForCausalLM, ...) when it holds the "
                        "result exactly, which transformers, vLLM, llama.cpp and TGI load with no remote code; "
                        "else decilm when only the MLP widths differ per block (all multiples of 256): "
                        "DeciLMForCausalLM, which vLLM and llama.cpp load natively and transformers with the "
                        "shipped code; else bundled (our modeling file, trust_remote_code). stock, decilm: "
                        "refuse unless it fits")


def _methods_parser(sub):
    sub.add_parser("methods", help="the width methods, what --sparsity means for each, and their -o options")


def run_methods(args):
    from .methods.options import describe
    from .methods.registry import METHODS, method_class

    listing = {}
    for name in METHODS:
        cls = method_class(name)
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(f"  --sparsity: {cls.SPARSITY}")
        for line in describe(cls.OPTIONS):
            print(f"  -o {line}")
        listing[name] = {key: option.default for key, option in cls.OPTIONS.items()}
    return listing


def _export_parser(sub):
    p = sub.add_parser("export", help="write a finished output in another format",
                       description="Convert the finished streamresize output IN_DIR into OUT_DIR as --format "
                                   "(exactly, or refused with the reason); IN_DIR is only read.")
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="stock",
                   help="stock (default), decilm (per-block MLP widths, multiples of 256), bundled, or auto "
                        "(the first of stock, decilm that holds the result, else bundled)")


def _plan_parser(sub):
    p = sub.add_parser("plan", help="memory, disk and time a compression will need, before loading any weight",
                       description="Print per step the bytes read, activation cache, micro-batch and statistics "
                                   "memory, the placement, the disk needed for OUT_DIR and the work dir (checked "
                                   "against free space) and a time estimate from this device's measured "
                                   "throughput; takes the same options as compress. The last line is JSON.")
    p.add_argument("model_dir")
    p.add_argument("out_dir", nargs="?", help="where the output would go (default: MODEL_DIR's name + "
                                              "'-streamresize' in the current directory)")
    p.add_argument("--world-size", type=int, default=1,
                   help="plan one process of a data-parallel run of this many processes on one node (torchrun "
                        "--nproc_per_node N): its share of the calibration sequences and of the default RAM")
    _run_options(p)


def _multiple(value):
    return "auto" if value == "auto" else int(value)


def _run_options(p):
    p.add_argument("--recipe", help="YAML recipe (configs/*.yaml); options given here override it")
    p.add_argument("--method", help="width method: pca (SliceGPT-style rotate-and-slice), prune (keep the "
                                    "support, drop the rest), dotresize (merge the rest back by optimal transport), "
                                    "disp (DISP-LLM: every block reads and writes its own subset of channels)")
    p.add_argument("--sparsity", type=float, help="fraction of the residual width removed (SliceGPT's meaning); "
                                                  "for disp: fraction of the block-linear parameters removed "
                                                  "(the DISP-LLM paper's pruning ratio)")
    p.add_argument("--allocation", choices=["uniform", "global", "learned"],
                   help="disp: uniform (every block keeps the same fraction, default), global (error-versus-"
                        "width curves from a pass over the dense model share one budget across blocks) or "
                        "learned (the paper's hypernetwork, trained on the whole model: needs it to fit)")
    p.add_argument("--mlp-sparsity", type=float, help="fraction of MLP intermediate neurons removed (default 0)")
    p.add_argument("--attention-sparsity", type=float,
                   help="fraction of attention query heads removed in every block, chosen by structured OBS "
                        "on o_proj (the same number from every KV group, so GQA stays stock; whole heads with "
                        "their keys and values where every head has its own); default 0")
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
                   help="method option, repeatable; each method takes its own: `streamresize methods` lists them "
                        "with their defaults (e.g. dotresize: epsilon=0.05, reader=lstsq; disp: refit=true)")
    p.add_argument("--dataset", nargs="+", help="calibration text: local .txt (documents split at blank lines) "
                                                "or .jsonl (a 'text' field per line); or 'random' / 'random:SEED': "
                                                "uniform random token ids, no tokenizer needed (for measuring runs)")
    p.add_argument("--num-calibration-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--max-seq-length", type=int, help="tokens per calibration sequence (default 2048)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, help="seed for sampling calibration windows (default 0)")
    p.add_argument("--width-multiple", type=_multiple,
                   help="round kept widths down to a multiple of this; auto (default): the largest of 128/64/32/"
                        "16/8 that leaves at least 16 widths to choose from (GPU-friendly shapes) and, for an MLP width "
                        "shared by every block (--allocation uniform), whose one step costs at most 1%% of the "
                        "parameters; 256 for MLP widths under --save-format decilm (its ffn_mult encoding needs them)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="output dtype (default: the input's)")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the block's own computation; statistics are summed in float64 (default: "
                        "bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--statistics-products", choices=["auto", "float64", "float32"],
                   help="precision of each micro-batch's Gram product (x xᵀ) before it is summed in float64: "
                        "float32 (TF32 off) is what a consumer GPU is fast at; float64 is exact (default: float32 "
                        "on a GPU, float64 on the CPU)")
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
    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a checkpoint",
                       description="Evaluate MODEL_DIR on local data: perplexity (--dataset), zero-shot multiple "
                                   "choice (--tasks), lm-evaluation-harness tasks (--lm-eval), speed and memory "
                                   "against the source model (--speed). Prints a table; the last line printed "
                                   "is the result as JSON, also written to --output.")
    p.add_argument("model_dir")
    p.add_argument("--dataset", nargs="+", help="local .txt or .jsonl text for perplexity")
    p.add_argument("--max-seq-length", type=int, default=2048, help="tokens per perplexity window; longest "
                                                                   "zero-shot context + choice (default 2048)")
    p.add_argument("--stride", type=int, help="start a perplexity window every STRIDE tokens and score only the "
                                              "tokens no earlier window scored (default: --max-seq-length, "
                                              "non-overlapping windows)")
    p.add_argument("--num-samples", type=int, help="evaluate at most this many perplexity windows")
    p.add_argument("--tasks", nargs="+", default=[],
                   help="zero-shot tasks: JSONL files of {\"context\", \"choices\", \"label\"} records, or "
                        "the names of shipped tasks (wiki-next-sentence)")
    p.add_argument("--limit", type=int, help="score at most this many items per zero-shot or lm-eval task")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (needs lm_eval "
                                                      "installed and the tasks' data available offline)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="directory of extra lm-eval task YAML files")
    p.add_argument("--speed", action="store_true", help="measure prefill and decode tokens/s and peak memory "
                                                        "against the source model, interleaved, median of runs")
    p.add_argument("--baseline", help="model to compare speed against (default: the source the output recorded)")
    p.add_argument("--prompt-length", type=int, default=128, help="speed: prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="speed: greedily generated tokens (default 32)")
    p.add_argument("--speed-batch-size", type=int, default=1, help="speed: sequences per batch (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="speed: runs per model, median taken (default 5)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); on a busy "
                                               "machine fewer threads than cores keeps timings steady")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="JSON result file (default: streamresize_eval.json in MODEL_DIR when it is a "
                                    "streamresize output, where `report` finds it; none otherwise)")


def _report_parser(sub):
    p = sub.add_parser("report", help="Markdown report with plots of compressed outputs",
                       description="Write a Markdown report (and PNG plots when matplotlib is installed) from what "
                                   "compression recorded in each OUT_DIR and what `eval` wrote there; with several "
                                   "inputs, also perplexity against parameter count per method. An input may also "
                                   "be an eval JSON file (e.g. of the dense source, from eval --output).")
    p.add_argument("inputs", nargs="+", metavar="OUT_DIR")
    p.add_argument("-o", "--output", help="report directory (default: OUT_DIR/report for one input)")


RECIPE_OPTIONS = ("method", "sparsity", "mlp_sparsity", "attention_sparsity", "target_size", "mlp_ratio", "mlp_method", "basis",
                  "allocation", "head", "dataset", "num_calibration_samples", "max_seq_length", "batch_size",
                  "device", "seed", "width_multiple", "dtype", "compute_dtype", "statistics_products")


def parse_options(pairs):
    """KEY=VALUE strings to a dict, values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise StreamResizeError(f"--option {pair}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(value)  # safe: a !!python tag is an error, never run
        except yaml.YAMLError as e:
            raise StreamResizeError(f"--option {pair}: not a plain value ({e})".replace("\n", " ")) from None
    return options


def _recipe_and_memory(args):
    from .placement import MemoryOptions
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, {k: getattr(args, k) for k in RECIPE_OPTIONS}, parse_options(args.option))
    memory = MemoryOptions(max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
                           cache_location=args.cache_location, prefetch=not args.no_prefetch)
    return recipe, memory


def _writable(path):
    """True when `path` (or, if it does not exist yet, the nearest folder above it) can be written."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.access(path, os.W_OK | os.X_OK) if os.path.isdir(path) else os.access(path, os.W_OK)


def check_writable(out_dir, work_dir):
    """Refuse a read-only output or work dir before any work (permission bits only: they do not stop
    root). A finished output is left to the run (a rerun of the same command writes nothing there)."""
    from .checkpoint import INDEX_NAME
    from .pipeline import default_work_dir

    finished = os.path.exists(os.path.join(out_dir, INDEX_NAME))
    for what, path, option in (("output directory", out_dir, "OUT_DIR"),
                               ("work dir", work_dir or default_work_dir(out_dir), "--work-dir")):
        if what == "output directory" and finished:
            continue
        if not _writable(path):
            raise StreamResizeError(f"{os.path.abspath(path)}: the {what} is not writable (read-only or no "
                                    f"permission); make it writable or choose another {option}")


def run_compress(args):
    from .runtime import install_stop_handlers

    recipe, memory = _recipe_and_memory(args)  # checked before the heavy imports below
    check_writable(args.out_dir, args.work_dir)
    from .pipeline import compress

    restore = install_stop_handlers()
    try:
        result = compress(args.model_dir, args.out_dir, recipe, work_dir=args.work_dir, restart=args.restart,
                          memory=memory, overwrite=args.overwrite, save_format=args.save_format)
    except Preempted:
        raise  # the handlers stay: a further signal while the process exits still exits resumable, at once
    except BaseException:
        restore()
        raise
    restore()
    return result


def run_plan(args):
    import os

    from .pipeline import Run
    from .plan import check_disk, format_plan, make_plan

    recipe, memory = _recipe_and_memory(args)
    if args.world_size < 1:
        raise StreamResizeError(f"--world-size {args.world_size}: must be at least 1")
    dist = None
    if args.world_size > 1:
        from .distributed import Dist

        dist = Dist(0, args.world_size, 0, args.world_size)  # planned, not joined: no process group
    out_dir = args.out_dir or os.path.join(os.getcwd(), os.path.basename(os.path.abspath(args.model_dir)) + "-streamresize")
    compressor = Run(args.model_dir, out_dir, recipe, work_dir=args.work_dir, memory=memory, dist=dist)
    plan = make_plan(compressor, measure=True)
    print(format_plan(plan, compressor), flush=True)
    check_disk(plan)
    return plan.as_dict()


def run_eval(args):
    from .runtime import resolve_device
    from .evaluate import default_output, evaluate, format_table, save_result

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    speed = None
    if args.speed:
        speed = {"batch_size": args.speed_batch_size, "prompt_length": args.prompt_length,
                 "new_tokens": args.new_tokens, "repeats": args.repeats}
    lm_eval_tasks = [t for t in (args.lm_eval or "").split(",") if t]
    result = evaluate(args.model_dir, args.dataset, args.max_seq_length, args.num_samples, args.batch_size,
                      resolve_device(args.device), stride=args.stride, tasks=args.tasks, limit=args.limit,
                      lm_eval_tasks=lm_eval_tasks, lm_eval_include=args.lm_eval_include, speed=speed,
                      baseline=args.baseline)
    output = args.output or default_output(args.model_dir)
    if output:
        save_result(result, output)
        log.info("wrote %s", output)
    print(format_table(result))
    return result


def run_report(args):
    from .report import write_report

    if args.output is None and len(args.inputs) > 1:
        raise StreamResizeError("several inputs: pass --output DIR for the report")
    out_dir = args.output or os.path.join(args.inputs[0], "report")
    path = write_report(args.inputs, out_dir)
    log.info("wrote %s", path)
    return {"report": path, "files": sorted(os.listdir(out_dir))}


def run_export(args):
    from .formats import export
    from .workspace import DirectoryLock, inside

    src, dst = os.path.abspath(args.in_dir), os.path.abspath(args.out_dir)
    if inside(dst, src) or inside(src, dst):
        raise StreamResizeError(f"{dst}: the export must not be the input, inside it, or hold it")
    if os.path.isdir(dst) and os.listdir(dst):
        raise StreamResizeError(f"{dst}: not empty; export writes into a new or empty directory")
    created = not os.path.exists(dst)
    os.makedirs(dst, exist_ok=True)
    lock = DirectoryLock(dst, "export directory").acquire()
    try:
        fmt = export(src, dst, args.format)
    except BaseException:
        if created:  # a refused export leaves nothing behind
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
        raise
    finally:
        lock.release()
    log.info("wrote %s as %s", dst, fmt)
    return {"output": dst, "format": fmt}


COMMANDS = {"compress": run_compress, "plan": run_plan, "eval": run_eval, "report": run_report,
            "export": run_export, "methods": run_methods}


def _mount_of(path):
    """(device, mount point) of the file system holding `path`, from /proc/self/mounts; None if unknown."""
    path = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2:
                    continue
                device, mount = fields[0], fields[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and \
                        (best is None or len(mount) > len(best[1])):
                    best = (device, mount)
    except OSError:
        pass
    return best


def _fullest(paths):
    """Of `paths` (or the nearest existing folders above them), the one with the least free space."""
    best = None
    for path in paths:
        path = os.path.abspath(path)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        if best is None or st.f_bavail * st.f_frsize < best[0]:
            best = (st.f_bavail * st.f_frsize, path)
    return best[1] if best else None


def _os_error_message(error, paths=()):
    """A clear message for an OSError anywhere in `error`'s chain that the user can act on (a full
    disk, a read-only or forbidden path), or None. `paths`: where the command writes (output, work
    dir), to name the full file system when the error does not name its file."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        enospc = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
            "No space left on device" in text or "os error 28" in text
        if enospc:
            path = getattr(error, "filename", None) or _fullest(paths)
            where = _mount_of(path) if path else None
            device = f"{where[0]} ({where[1]})" if where else "device"
            what = (" writing " if getattr(error, "filename", None) else " holding ") + str(path) if path else ""
            return (f"no space left on {device}{what}; free space and rerun the same command to resume (what "
                    "was committed is kept)")
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and error.filename:
            return (f"{error.filename}: {error.strerror}; make it writable (or readable) or choose another "
                    "directory, then rerun the same command")
        error = error.__cause__ or error.__context__
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="streamresize", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _plan_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _export_parser(sub)
    _methods_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the traceback instead of the one-line message")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None  # a process of torchrun
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s " + (f"[rank {rank}] " if rank is not None else "") + "%(levelname)s %(message)s")
    if rank not in (None, "0") and args.command == "compress":
        log.setLevel(logging.WARNING)  # rank 0 tells the story; the others only warnings and errors
    try:
        result = COMMANDS[args.command](args)
    except StreamResizeError as e:
        if args.debug:
            raise
        log.error("%s", e)
        return 2
    except Preempted:
        return EXIT_RESUMABLE  # the pipeline logged where it stopped
    except KeyboardInterrupt:
        if args.debug:
            raise
        log.error("interrupted; run the same command again to resume")
        return 130
    except Exception as e:
        paths = [p for p in (getattr(args, "out_dir", None), getattr(args, "work_dir", None)) if p]
        if args.command == "compress" and not getattr(args, "work_dir", None):
            from .pipeline import default_work_dir

            paths.append(default_work_dir(args.out_dir))
        message = _os_error_message(e, paths)
        if message is None or args.debug:
            raise
        log.error("%s", message)
        return 2
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
