"""``tsdf-bench train``: (not built yet)."""
from ..errors import TsdfBenchError

HELP = "train (not built yet)"


def add_arguments(parser):
    pass


def main(args, registry):
    raise TsdfBenchError("'tsdf-bench train' is not built yet")
