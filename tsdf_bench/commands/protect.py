"""``tsdf-bench protect``: (not built yet)."""
from ..errors import TsdfBenchError

HELP = "protect (not built yet)"


def add_arguments(parser):
    pass


def main(args, registry):
    raise TsdfBenchError("'tsdf-bench protect' is not built yet")
