"""`python -m train`'s command line: the parser, the loss vocabulary, and what the parsed args ask for (the
(fusion, loss) variants, repeats x seeds, the equivalent command line for run.json and report.md)."""

from __future__ import annotations

import argparse
import shlex

LOSSES: tuple[str, ...] = ("mse", "l1", "smoothl1", "wsmoothl1")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from train.presets import PRESETS
    from xbmd_batch.clinical import REFERENCES

    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Cross-validated training of XAttn-BMD (and the concat baseline) on a DICOM cohort.",
        epilog="example: python -m train --cohort demo_out/cohort --preset quick --single-split --final "
        "--out runs/demo",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cohort", required=True, help="cohort folder (DICOMs anywhere below it)")
    p.add_argument("--meta", default=None, help="metadata table (default: <cohort>/meta.csv)")
    p.add_argument("--labels", default=None, help="label table with subject_id (default: <cohort>/truth.csv)")
    p.add_argument("--label-col", default="bmd_dxa", help="BMD column of the label table (g/cm²)")
    p.add_argument(
        "--key-column", default=None, help="META column matched against PatientID (as `score --key-column`)"
    )
    p.add_argument(
        "--path-column", default=None, help="META column naming each row's file (as `score --path-column`)"
    )
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--fusion", default="xattn", choices=["xattn", "concat"])
    p.add_argument(
        "--loss",
        default=None,
        choices=list(LOSSES),
        help="training loss (default: the preset's: quick mse, paper wsmoothl1)",
    )
    p.add_argument(
        "--compare",
        nargs="?",
        const="all",
        default=None,
        choices=["all", "fusion", "loss"],
        help="the paper's comparison on the same folds: XAttn vs concat ('fusion'), the four losses "
        "('loss'), or both (bare --compare)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="--compare fusion: repeats of K-fold CV with fresh fold assignments (default 5; 1 = off)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="--compare fusion: training seeds per fold and arm (default 3)",
    )
    p.add_argument("--folds", type=int, default=None, help="K for K-fold CV (default: the preset's)")
    p.add_argument(
        "--single-split", action="store_true", help="one stratified 90/10 split instead of K folds"
    )
    p.add_argument(
        "--split-by",
        default=None,
        metavar="COLUMN",
        help="leave-one-level-out validation on a label-table column, e.g. 'site' (leave-one-scanner-out)",
    )
    p.add_argument("--final", action="store_true", help="also train on all data -> <out>/final.pt")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's input size")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's max epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--backbone-lr-mult", type=float, default=None, help="ResNet trunk lr = lr * this")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's embedding width")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument(
        "--members",
        type=int,
        default=None,
        help="networks averaged inside one model, each trained on its own loss (default: the preset's)",
    )
    p.add_argument(
        "--wide-gain",
        default=None,
        choices=["on", "off"],
        help="metadata gain on the wide path's image score (default: the preset's; 'off' = the ablation)",
    )
    p.add_argument(
        "--wide-fit",
        default=None,
        choices=["inner", "full", "crossfit"],
        help="wide path fitted on the inner-training rows ('inner'), on the whole training part ('full'), "
        "or on the whole training part with the network trained on its cross-fitted residual ('crossfit'); "
        "default: the preset's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="PATH",
        help="torchvision ImageNet resnet34 state dict (a local file; nothing is downloaded) to start the "
        "resnet34 encoder from (the RGB stem summed to one channel); paper preset",
    )
    p.add_argument(
        "--reference", default="nhanes3-hologic", choices=sorted(REFERENCES), help="T-score reference"
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="screening operating points: cut-off on the estimate reaching this sensitivity, chosen on the "
        "other folds and applied out of fold",
    )
    p.add_argument("--workers", type=int, default=2, help="decode processes for the image cache")
    p.add_argument("--cache-dir", default=None, help="image cache folder (default: <out>/.xbmd_cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1: on a shared box OpenMP spin-waiting "
        "makes 2 threads on 2 busy cores several times slower than 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def vname(fusion: str, loss: str) -> str:
    return f"{fusion}-{loss}"


def variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(fusion, loss) pairs; the primary (the one asked for) first."""
    primary = (args.fusion, args.loss)
    if not args.compare:
        return [primary]
    want: list[tuple[str, str]] = []
    if args.compare in ("all", "fusion"):
        want += [("xattn", args.loss), ("concat", args.loss)]
    if args.compare in ("all", "loss"):
        want += [("xattn", loss) for loss in LOSSES]
    out = [primary]
    for v in want:
        if v not in out:
            out.append(v)
    return out


def repeats_seeds(args: argparse.Namespace) -> tuple[int, int]:
    """--compare fusion defaults to 5 repeats x 3 seeds (issue 10); every other run to one CV, one seed."""
    fusion = args.compare in ("all", "fusion")
    repeats = args.repeats if args.repeats is not None else (5 if fusion else 1)
    seeds = args.seeds if args.seeds is not None else (3 if fusion else 1)
    return max(1, repeats), max(1, seeds)


def command_line(args: argparse.Namespace) -> str:
    """The equivalent command line: the argv when run from a shell, else rebuilt from the non-default args."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = []
        for act in get_args_parser()._actions:
            if not act.option_strings or act.dest == "help":
                continue
            val = getattr(args, act.dest, act.default)
            if val == act.default:
                continue
            if isinstance(act, argparse._StoreTrueAction):
                argv.append(act.option_strings[-1])
            else:
                argv += [act.option_strings[-1], str(val)]
    return "python -m train " + " ".join(shlex.quote(a) for a in argv)
