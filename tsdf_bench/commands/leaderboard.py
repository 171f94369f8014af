"""``tsdf-bench leaderboard``: (not built yet)."""
from ..errors import TsdfBenchError

HELP = "leaderboard (not built yet)"


def add_arguments(parser):
    pass


def main(args, registry):
    raise TsdfBenchError("'tsdf-bench leaderboard' is not built yet")
