"""Command line (``chlib`` once installed, or ``python -m chlib``): ``chlib run NOTEBOOK... --run
NAME -p KEY VALUE ...`` runs notebooks headless; ``chlib params NOTEBOOK`` lists a notebook's
parameters; ``chlib identify FILE... --run runs/NAME`` identifies recordings against a trained
run's references (its dataset's train + val recordings) and prints the best match of each;
with ``--segments`` also which works each file holds and where (its timeline); ``chlib serve
--run runs/NAME`` serves the run to other people: a web page and a JSON API (127.0.0.1:8000);
``chlib train runs/NAME`` trains (or resumes) a run from its config/hparams.yaml, in one
process or, under ``torchrun --nproc_per_node N -m chlib train runs/NAME``, on N devices (DDP)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chlib.core.errors import ChlibError
from chlib.retrieval import evaluate
from chlib.retrieval import identify as ident
from chlib.retrieval.segment import identify_segments
from chlib.retrieval.timeline import UNKNOWN
from chlib.serve import Limits
from chlib.serve.app import serve
from chlib.train.loop import train
from chlib.ui import runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute numbered notebooks headless with papermill")
    run.add_argument("notebooks", nargs="+", help="e.g. 01_prepare 02_extract (or 01 02)")
    run.add_argument("--run", required=True, help="run name: outputs go to runs/<name>/notebooks/")
    run.add_argument("--runs-root", default="runs")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("KEY", "VALUE"), help="a notebook parameter (repeatable): a literal or text")
    run.add_argument("--keep-going", action="store_true", help="run later notebooks after a failure")
    sub.add_parser("params", help="list the parameters a notebook declares").add_argument("notebook")
    idf = sub.add_parser("identify", help="identify audio files with a trained run")
    idf.add_argument("queries", nargs="+", help="audio files, folders of audio files or manifests")
    idf.add_argument("--run", required=True, help="the trained run folder (runs/<name>)")
    idf.add_argument("--dataset", help="references: this dataset's train + val (default: the run's)")
    idf.add_argument("--checkpoint", default="best", help='"best", "latest" or an epoch number')
    idf.add_argument("--top-k", type=int, default=10, help="matches kept per query (in --csv)")
    idf.add_argument("--csv", help="write every query's top-k rows here")
    idf.add_argument("--device", default="auto", help='"auto", "cpu", "cuda" or "mps"')
    idf.add_argument("--segments", nargs="?", const="", metavar="CSV",
                     help="also print each file's timeline (works and where); with a path, "
                          "write segments.csv there")
    srv = sub.add_parser("serve", help="serve a trained run: web page + JSON API")
    srv.add_argument("--run", required=True, help="the trained run folder (runs/<name>)")
    srv.add_argument("--dataset", help="references: this dataset's train + val (default: the run's)")
    srv.add_argument("--checkpoint", default="best", help='"best", "latest" or an epoch number')
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: this computer only; 0.0.0.0: everyone)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--device", default="auto", help='"auto", "cpu", "cuda" or "mps"')
    srv.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb)
    srv.add_argument("--max-duration-s", type=float, default=Limits.max_duration_s)
    trn = sub.add_parser("train", help="train or resume a run (under torchrun: one process "
                         "per device, batch_size = the global batch)")
    trn.add_argument("run_dir", nargs="?", metavar="RUN", help="the run folder (runs/<name>), "
                     "with config/hparams.yaml (chlib.train.loop.make_run_config writes one); "
                     "under torchrun give it so, or as -- train --run RUN (torchrun takes --run "
                     "for its own --run-path)")
    trn.add_argument("--run", help="the run folder, as RUN")
    trn.add_argument("--device", default="auto", help='"auto" (the config\'s device), "cpu", '
                     '"cuda" or "mps" (one process only)')
    trn.add_argument("--max-epochs", type=int, help="stop before this epoch (default: the config's)")
    trn.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            print("\n".join(runner.parameter_help(runner.notebook_path(args.notebook))))
            return 0
        if args.command == "identify":
            return identify(args)
        if args.command == "train":
            if not (args.run or args.run_dir) or (args.run and args.run_dir):
                parser.error("train: give the run folder once: chlib train RUN (or --run RUN)")
            result = train(args.run or args.run_dir, device=args.device, max_epochs=args.max_epochs,
                           progress=not args.quiet)
            return 130 if result.interrupted else 0
        if args.command == "serve":
            print(f"chlib serve: open http://{args.host}:{args.port}/ (API docs: /docs); "
                  "Ctrl-C stops it", file=sys.stderr)
            serve(args.run, host=args.host, port=args.port, dataset_dir=args.dataset,
                  checkpoint=args.checkpoint, device=args.device,
                  limits=Limits(max_upload_mb=args.max_upload_mb,
                                max_duration_s=args.max_duration_s))
            return 0
        record = runner.run_notebooks(
            args.notebooks, run=args.run, runs_root=args.runs_root,
            parameters={k: runner.parse_cli_value(v) for k, v in args.parameter},
            stop_on_error=not args.keep_going)
    except ChlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(record.summary())
    return 0 if record.ok else 1


def identify(args: argparse.Namespace) -> int:
    """``chlib identify``: one line per query (file, best work, p-value, verdict); 1 if none
    could be read."""
    model, hp, epoch, note = evaluate.load_checkpoint(args.run, args.checkpoint, args.device)
    dataset = Path(args.dataset) if args.dataset else hp.resolve_path(hp.train_path).parent
    index, status = ident.reference_index_for_run(args.run, model, hp,
                                                  ident.reference_records(dataset),
                                                  device=args.device, progress=False)
    print(f"model: {args.run} epoch {epoch} {note}; {status}", file=sys.stderr)
    paths = [p for q in args.queries for p in ident.identification_queries(q, dataset).paths]
    report = ident.identify(paths, model=model, hp=hp, index=index, device=args.device,
                            top_k=args.top_k)
    if args.csv:
        report.to_csv(args.csv)
    for row in report.best():
        found = (f"{row['work']}  p={row['p_value']:.2g}  {row['verdict']}" if not row["error"]
                 else f"not identified: {row['error']}")
        print(f"{Path(row['query']).name}: {found}")
    report.first_match()  # a ChlibError naming each file when none could be read
    if args.segments is not None:
        segments(args.segments, paths, model, hp, index, args.device)
    return 0


def segments(csv: str, paths: list[str], model: object, hp: object, index: object,
             device: str) -> None:
    """``--segments``: per readable file, its segments (start-end, work, p-value)."""
    rep = identify_segments(paths, model=model, hp=hp, index=index, device=device)
    if csv:
        rep.to_csv(csv)
    for path, tl in rep.timelines.items():
        print(f"{Path(path).name}: " + "; ".join(
            f"{s['start_s']:.0f}-{s['end_s']:.0f} s {s['work']}"
            + (f" (p={s['p_value']:.2g})" if s["work"] != UNKNOWN else "") for s in tl.segments))


if __name__ == "__main__":
    sys.exit(main())
