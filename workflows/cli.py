"""`kd` command line: run | precompute | train | tune | report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from kd_ops.fsio import Loc
from workflows import console
from workflows.config import ConfigError, load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (e.g. workflows/configs/mnist1d.yaml)")
    p.add_argument("--out", default="runs/default", help="output directory (data, teachers, store, summary)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set tune.num_samples=4 (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in the current directory)")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--verbose", action="store_true", help="stream Ray, Train and Tune output to the terminal "
                   "(default: into <out>/logs/kd.log)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kd-ops")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kd", description="Knowledge distillation on Ray: precompute teacher "
                                 "soft labels once, train and tune students on them, record it all in MLflow.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    ap.add_argument("--version", action="version", version=f"kd {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("run", "the whole pipeline: teachers, precompute, tune, final student, summary"),
                       ("precompute", "run the teachers over the inputs into the soft-label store"),
                       ("train", "train one student with the config's distillation settings (no tuning)"),
                       ("tune", "search temperature, alpha, width and teacher weights over the store")):
        sp = sub.add_parser(name, help=text)
        _common(sp)
        if name == "run":
            sp.add_argument("--restart", action="store_true", help="start over: ignore (and delete) the checkpoints, "
                            "search, store and trained teachers a previous run left under --out (the default "
                            "continues a run whose driver died where it stopped)")
    rep = sub.add_parser("report", help="print the summary table of a finished run and write its page "
                         "(<out>/report.html: one self-contained HTML file)")
    rep.add_argument("out", help="the run's --out directory")
    bench = sub.add_parser("bench", help="benchmarks that time or size both sides of a comparison in one run")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("store", help="bytes/token and student perplexity: full logits vs top-k 8/32/128")
    bs.add_argument("--config", default="workflows/configs/tiny-lm.yaml")
    bs.add_argument("--run", default="runs/tiny-lm", help="a finished `kd run` of that config (teacher + data)")
    bs.add_argument("--out", default="runs/bench-store")
    bs.add_argument("--train-rows", type=int, default=2000, help="training sequences used per store")
    bs.add_argument("--epochs", type=int, default=1)
    bs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bp = bsub.add_parser("precompute", help="plain PyTorch loop vs the kd-ops precompute pipeline, one run")
    bp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bp.add_argument("--teacher", choices=["mnist1d", "lm"], help="default: mnist1d on cpu, the 135M LM on cuda")
    bp.add_argument("--rows", type=int, help="input rows (sequences for the LM)")
    bp.add_argument("--batch-size", type=int)
    bp.add_argument("--seq-len", type=int, default=512)
    bp.add_argument("--actors", type=int, default=1, help="teacher actors in the pipeline's pool")
    bp.add_argument("--threads", type=int, help="torch threads per actor (default: CPU cores / actors on cpu, 1 on cuda)")
    bp.add_argument("--calls-per-actor", type=int, default=2, help="batches in flight in one actor")
    bp.add_argument("--json", action="store_true")
    bi = bsub.add_parser("ingest", help="streaming ingest from a synthetic store vs in-memory tensors, one run")
    bi.add_argument("--store-gb", type=float, default=5.0, help="size of the synthetic store to build (≥ 4 GB is the point)")
    bi.add_argument("--rows-per-file", type=int, default=16384)
    bi.add_argument("--batch-size", type=int, default=1024)
    bi.add_argument("--memory-rows", type=int, default=200_000, help="rows the in-memory loop trains on")
    bi.add_argument("--student-width", type=int, default=64, help="the student CNN's width (1,000-class head)")
    bi.add_argument("--keep", metavar="DIR", help="build the store in DIR and keep it (default: a temp dir, removed); "
                    "a store already there is reused")
    bi.add_argument("--read-tasks", type=int, default=2, help="Ray Data read tasks feeding the Train worker")
    bi.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    bsc = bsub.add_parser("scale", help="precompute throughput on N local nodes of equal CPUs, as a ratio to one node")
    bsc.add_argument("--nodes", default="1,2,4", help="node counts to compare (comma-separated)")
    bsc.add_argument("--cpus-per-node", type=int, help="default: machine cores / the largest node count")
    bsc.add_argument("--rows", type=int, default=200_000)
    bsc.add_argument("--rows-per-file", type=int, default=4096)
    bsc.add_argument("--batch-size", type=int, default=1024)
    bsc.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    bm = bsub.add_parser("methods", help="labels only, Hinton KD, feature/attention/relation KD, DKD, a temperature "
                         "schedule, TAKD and born-again: same student and budget, mean ± std over seeds")
    bm.add_argument("--config", default="workflows/configs/mnist1d.yaml")
    bm.add_argument("--out", default="runs/bench-methods", help="data, teachers and store (reused when current)")
    bm.add_argument("--seeds", type=int, default=3)
    bm.add_argument("--method", action="append", help="only this method (repeatable; default: all)")
    bm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every method, e.g. --set train.fit.epochs=10")
    bm.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    btu = bsub.add_parser("tune", help="the fixed cost of a Tune trial (kd-ops, Ray Train trials, a plain loop) and "
                          "what ASHA and Optuna's TPE save, one run")
    btu.add_argument("--config", default="workflows/configs/mnist1d.yaml")
    btu.add_argument("--out", default="runs/bench-tune", help="data, teachers and store (reused when current)")
    btu.add_argument("--trials", type=int, default=6)
    btu.add_argument("--epochs", type=int, default=3, help="epochs per trial (ASHA's max_t)")
    btu.add_argument("--no-searchers", action="store_true", help="only the fixed-cost comparison")
    btu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    btu.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    bt = bsub.add_parser("train", help="student-only vs offline KD vs online KD step rates, one run")
    bt.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bt.add_argument("--pair", choices=["mnist1d", "lm"], help="default: mnist1d on cpu, the LM pair on cuda")
    bt.add_argument("--steps", type=int, default=100)
    bt.add_argument("--batch-size", type=int)
    bt.add_argument("--seq-len", type=int, default=512)
    bt.add_argument("--json", action="store_true")
    for bp_ in bsub.choices.values():
        bp_.add_argument("--verbose", action="store_true", help="stream Ray's output to the terminal (default: "
                         "into <out>/logs/kd.log; runs/bench-<name>/logs/kd.log for benches without --out)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("kd: interrupted", file=console.err())
        return 130
    except Exception as e:
        root = _root_cause(e)
        if root is None:
            traceback.print_exc(file=console.err())
            raise
        if args.debug:
            traceback.print_exc(file=console.err())
        print(f"kd: error: {root}", file=console.err())
        return 2
    finally:
        # end the Ray session this command started (not one its caller, e.g. a test, owns), so its
        # last worker logs are flushed while the console still sends them to the log file
        if not ray_was_up and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        console.restore()


USER_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def _root_cause(e: BaseException) -> BaseException | None:
    """The error a user can act on, or None: Ray wraps exceptions raised in tasks and actors
    (RayTaskError with `.cause`, Ray Data's UserCodeException with `__cause__`), so the innermost
    bad-input error of the chain is the one whose message is meant for the user."""
    seen = set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, USER_ERRORS) and not type(e).__module__.startswith("ray."):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _dispatch(args) -> int:
    if args.command == "bench":
        import importlib

        # Ray's output into the bench's log file; kd-ops' progress lines and the result on the terminal
        console.setup(getattr(args, "out", None) or f"runs/bench-{args.bench}", args.verbose)
        module = args.bench if args.bench in ("store", "scale", "methods", "ingest", "tune") else "speed"
        return importlib.import_module(f"workflows.bench.{module}_bench").main(args)
    if args.command == "report":
        from workflows import report_page
        from workflows.summary_table import print_summary

        path = Loc.of(args.out) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run did not finish (or --out is wrong)")
        summary = json.loads(path.read_text())
        print_summary(summary)
        print(f"report: {report_page.write(summary, Loc.of(args.out))}")
        return 0
    cfg = load_config(args.config, args.overrides)
    out = args.out  # a local path or a URI (s3://…): pathlib would mangle the latter
    console.setup(out, args.verbose)
    if args.command == "run":
        from workflows.pipeline import run

        run(cfg, out, tracking_uri=args.tracking_uri, ray_address=args.ray_address, restart=args.restart)
        return 0
    from workflows import commands

    return getattr(commands, args.command)(cfg, out, tracking_uri=args.tracking_uri, ray_address=args.ray_address)


if __name__ == "__main__":
    sys.exit(main())
