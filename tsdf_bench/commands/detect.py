"""``tsdf-bench detect``: (not built yet)."""
from ..errors import TsdfBenchError

HELP = "detect (not built yet)"


def add_arguments(parser):
    pass


def main(args, registry):
    raise TsdfBenchError("'tsdf-bench detect' is not built yet")
