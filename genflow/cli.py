"""The ``genflow`` command line: ``demo``, ``bench``, ``train``, ``sample`` and ``table2``.

``demo`` (``genflow.demo``) trains two small models on a 2-D Gaussian mixture and compares
solvers on them; ``bench`` (``genflow.bench``) runs the benchmarks; ``train`` and ``sample``
(``genflow.train.commands``) train any family on a data set and sample a trained run; ``table2``
(``genflow.train.table2``, also via ``commands``) reproduces Bogensperger's Table 2. Each subcommand's module provides its
argument definitions and a ``run(args) -> int``; ``genflow.bench`` is imported only when
``genflow bench`` runs. Bad options, unusable files and run directories exit with status 2 and a
message naming the option or file (no traceback); a run that cannot go on (a run directory in
use, a non-finite loss, a failed write) exits with status 1 and a message.
"""
import argparse
import importlib
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from genflow import demo

    parser = argparse.ArgumentParser(prog="genflow", description="genflow: fast diffusion and flow samplers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser(
        "demo", help="train small models on a 2-D mixture and compare solvers (table and figure)",
        description="Train two small models on a 2-D Gaussian mixture (or use its exact denoiser), sample "
                    "them with several solvers and step counts, print a quality/speed table and save a figure."))
    # bench's options come from genflow.bench, loaded only when it runs: its --help included
    sub.add_parser("bench", add_help=False, help="benchmark solvers and fused ops against the peers")
    from genflow.train import commands

    commands.add_train_arguments(sub.add_parser(
        "train", help="train a model family on a data set (checkpoints, resume, metrics log, samples figure)"))
    commands.add_sample_arguments(sub.add_parser("sample", help="draw samples from a genflow train run"))
    commands.add_table2_arguments(sub.add_parser(
        "table2", help="train the six families of Bogensperger's 'Introduction to Generative Modeling', Table 2 on its toy set and compare KLs with the paper"))
    return parser


def _bench(rest) -> int:
    bench = importlib.import_module("genflow.bench")
    parser = argparse.ArgumentParser(prog="genflow bench", description=bench.__doc__)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(rest))


def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("train", "sample", "table2"):
        from genflow.train import commands

        from genflow.errors import NonFiniteError
        from genflow.checkpoint import RunLockedError

        run = {"train": commands.run_train, "sample": commands.run_sample, "table2": commands.run_table2}[args.command]
        try:
            return run(args)
        except (ValueError, TypeError) as error:  # an option, file or run directory that cannot be used
            parser.error(str(error))
        except (RunLockedError, NonFiniteError, OSError) as error:  # the run could not go on
            print(f"genflow {args.command}: error: {error}", file=sys.stderr)
            return 1
    from genflow import demo

    try:
        args = demo.resolve(args)
    except ValueError as error:
        parser.error(str(error))
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
