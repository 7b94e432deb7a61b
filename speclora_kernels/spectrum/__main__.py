"""``python -m speclora_kernels.spectrum BASE FINETUNED --out DIR``: see :mod:`speclora_kernels.spectrum`."""
from __future__ import annotations

import argparse
import os
import sys

from .analysis import MEASURES, SOLVERS
from .report import analyse, format_suggestion, format_table, write_json


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m speclora_kernels.spectrum",
        description="Per layer: top singular values before/after and their ratio, |cos| of the "
                    "singular vectors, the share of the change dW held by the top-k singular "
                    "directions of W0, and a suggested k. Writes DIR/spectrum.json and one PNG per "
                    "layer kind.")
    ap.add_argument("base", metavar="BASE", help="the model's weights: a .safetensors file or a folder of them")
    ap.add_argument("finetuned", metavar="FINETUNED",
                    help="the weights after full fine-tuning (file or folder), or an adapter directory "
                         "(save_adapter, or PEFT's save_pretrained)")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    ap.add_argument("--top", type=_positive_int, default=32, metavar="N",
                    help="singular values/vectors compared per layer (default 32)")
    ap.add_argument("--k", type=_positive_int, default=None, metavar="K",
                    help="energy curve length (default: every direction for a full SVD, 64 for a "
                         "randomized one)")
    ap.add_argument("--share", type=_share, default=0.9,
                    help="share of ||dW||_F^2 the suggested k must capture (default 0.9)")
    ap.add_argument("--measure", choices=MEASURES, default="two_sided",
                    help="which share the suggested k uses (default two_sided; see the docs)")
    ap.add_argument("--svd", choices=SOLVERS, default="auto",
                    help="auto: full SVD up to min(out, in) = 1024, randomized above")
    ap.add_argument("--targets", metavar="REGEX",
                    help="only the layers whose whole module name matches REGEX (default: every "
                         "common 2-D weight but embeddings and norms / every adapted layer)")
    ap.add_argument("--suggest", action="store_true",
                    help="print the suggested k as inject calls and a PEFT rank_pattern")
    ap.add_argument("--no-plots", action="store_true", help="write the JSON only")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out: {args.out} exists and is not a folder")
    if not args.no_plots:
        from .plot import require_matplotlib
        try:
            require_matplotlib()
        except ImportError as e:
            ap.error(str(e))
    try:
        result = analyse(args.base, args.finetuned, top=args.top, k=args.k, share=args.share,
                         measure=args.measure, targets=args.targets, svd=args.svd,
                         progress=not args.quiet)
    except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: an NF4 adapter without bitsandbytes
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_json(result, args.out)
    print(format_table(result))
    print(f"wrote {path}")
    if not args.no_plots:
        from .plot import plot_result
        for png in plot_result(result, args.out):
            print(f"wrote {png}")
    if args.suggest:
        print(format_suggestion(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
