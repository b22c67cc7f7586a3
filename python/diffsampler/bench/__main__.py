"""python -m diffsampler.bench <subcommand> [options]; subcommands: step, loop, quality, lml, resample,
resample_dist, digits, smc, serve, pipeline, nfe, teleport, guidance, report."""

import sys

from . import (digits_solvers, guidance, lml, loop, nfe, pipeline, quality, report, resample, resample_dist, serve, smc,
               step, teleport)

SUBCOMMANDS = {"step": step.main, "loop": loop.main, "quality": quality.main, "lml": lml.main,
               "resample": resample.main, "resample_dist": resample_dist.main, "digits": digits_solvers.main,
               "smc": smc.main, "serve": serve.main, "pipeline": pipeline.main, "nfe": nfe.main,
               "teleport": teleport.main, "guidance": guidance.main, "report": report.main}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m diffsampler.bench {{{','.join(SUBCOMMANDS)}}} [options]  (--help per subcommand)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    if not argv or argv[0] not in SUBCOMMANDS:
        got = f"unknown subcommand {argv[0]!r}" if argv else "a subcommand is required"
        print(f"{usage}\npython -m diffsampler.bench: error: {got}", file=sys.stderr)
        sys.exit(2)
    SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
