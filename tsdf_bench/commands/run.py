"""``tsdf-bench run``: (not built yet)."""
from ..errors import TsdfBenchError

HELP = "run (not built yet)"


def add_arguments(parser):
    pass


def main(args, registry):
    raise TsdfBenchError("'tsdf-bench run' is not built yet")
