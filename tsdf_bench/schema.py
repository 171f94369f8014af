"""The result-row schema: one cell's key and every field a stored row may carry, in one place.

A **row** is one cell (:class:`CellKey`: defense, model, adaptation, round, seed) of one run, as
:meth:`tsdf_bench.harness.store.ResultsStore.rows` returns it: the key, ``run_id`` / ``status`` /
``error``, then the cell's metric columns and its provenance, flattened.  The runner, the Ray
executor, the store and the leaderboard all use :class:`CellKey`; :data:`PROVENANCE` documents
every provenance field (a test fails when the runner writes one that is not documented here).
Metric columns are declared by the metric plugins (``columns``) and by the harness's own rates
(:data:`HARNESS_RATES`, each with :data:`RATE_SUFFIXES`).  A plugin's rate with counts (detection
recall / precision / F1 per detector, the attacker's crop yield) declares its whole
:func:`rate_family`; the leaderboard shows the family as one column.
"""
from __future__ import annotations

from typing import NamedTuple


class CellKey(NamedTuple):
    """One cell: a defense, a model, an adaptation, a round (0 = before retraining) and a seed."""

    defense: str
    model: str
    adaptation: str
    round: int
    seed: int

    def key(self) -> dict:
        return self._asdict()

    @property
    def label(self) -> str:
        """``defense/model/adaptation/round k/seed s`` (log lines)."""
        return f"{self.defense}/{self.model}/{self.adaptation}/round {self.round}/seed {self.seed}"

    @classmethod
    def of(cls, row: dict) -> "CellKey":
        """The key of a stored row (a missing seed is 0, as in rows of older runs)."""
        return cls(str(row["defense"]), str(row["model"]), str(row["adaptation"]), int(row["round"]),
                   int(row.get("seed", 0) or 0))


CELL_KEYS = CellKey._fields
STATUS_KEYS = ("run_id", "status", "error")
KEY_COLUMNS = (*CELL_KEYS, *STATUS_KEYS)

#: Rates the harness computes itself (tsdf_bench.harness.measure), each with its count and interval.
HARNESS_RATES = ("sr_mask", "sr_mask_orig", "sr_mask_ctrl", "sr_mask_worst")
RATE_SUFFIXES = ("_lo", "_hi", "_n", "_hits", "_photos")


def rate_family(name: str) -> tuple[str, ...]:
    """A rate's columns as :func:`tsdf_bench.stats.rate_columns` writes them: the rate, its 95%
    interval (``_lo``, ``_hi``), trials (``_n``), successes (``_hits``) and ``{photo: [successes,
    trials]}`` (``_photos``)."""
    return (name, *(f"{name}{s}" for s in RATE_SUFFIXES))


#: Other harness columns of retraining rounds.  ``attacker_keeps``: the model the attacker forges
#: with (``sr_mask_worst``), ``"retrained"`` unless retraining broke it (clean drift above the
#: success threshold) or the protection disrupts it more than the original; a tie keeps the
#: retrained model (:func:`tsdf_bench.harness.attacker.keeps`).
HARNESS_COLUMNS = ("l2_mask_orig", "l2_mask_ctrl", "adaptation_gain", "attacker_keeps", "eval_kept", "eval_dropped")

PROVENANCE = {
    # the run
    "config_hash": "sha256 of the resolved config (tsdf_bench.config)",
    "run_name": "[run] name", "scale": "paper, demo or smoke", "versions": "package and plugin versions",
    "device": "where it ran", "git_commit": "the repository's commit", "git_dirty": "uncommitted changes",
    "optimize": "the speed switch (tsdf_bench.speed)",
    "torch_threads": "torch CPU threads of the process that measured the row (1 per worker with [run] workers > 1)", "metrics": "the metric plugins that ran",
    # the data and its roles (docs/threat-model.md)
    "data": "the data source, described", "data_hash": "sha256 of the run's images and labels",
    "data_notes": "notes about the data", "split": "how the roles were made, persons and photos per role",
    "n_fit": "images the defense was fitted on", "n_collect": "photos the attacker collected",
    "n_eval": "photos measured", "seed": "the cell's seed",
    # the attacker
    "attacker_detector": "the detector of the attacker's data preparation", "crop": "its crop mode",
    "pipeline": "detect or aligned (no detector)", "adaptation_plugin": "the adaptation's plugin",
    "adaptation_options": "its options", "purifies": "it transforms the input",
    "compare_to": "purified or clean: what a purification is scored against",
    "g_steps": "generator updates taken in the last retraining", "d_steps": "discriminator updates taken",
    "g_steps_budget": "[adaptations] g_steps", "n_critic": "D steps per G step", "lr": "G learning rate",
    "lr_d": "D learning rate", "reg_every": "gradient-penalty interval",
    "retrain_images": "crops the attacker retrained on", "model_unchanged": "retraining left the weights equal",
    "adaptation_info": "what the adaptation reported",
    "control_checkpoint_sha256": "weights of the clean-retraining control",
    "control_retrain_images": "crops the control retrained on", "retrain_is_control": "the round's collection was the clean one, so its retrained model is the control's (not retrained twice)",
    # the defense
    "defense_plugin": "the defense's plugin", "defense_options": "its resolved options", "eps": "its budget",
    "transfer_of": "the defense a [transfer] variant comes from", "fit_key": "sha256 of what the fit depends on",
    "fit_models": "models it was fitted on", "fit_detectors": "detectors it was fitted on",
    "fit_problems": "models or detectors that failed to load for the fit",
    "detectors_missing": "measured detectors that failed ([detectors] allow_missing_detectors): their columns are left out",
    "perturbation_sha256":
    "the universal perturbation's sha256, or of the per-image perturbations", "model_order": "CMUA's model order",
    "factors": "CMUA's per-model step factors", "targets": "the targets a defense attacked",
    # the model
    "checkpoint_sha256": "weights (state dict) of the model measured in this round",
    "base_checkpoint_sha256": "weights of the round-0 model", "checkpoint_path": "the checkpoint file",
    "checkpoint_file_sha256": "sha256 of that file",
    "weights_source": "demo models: shipped (package data), cached (trained here before) or trained (in this run)",
    "random_init": "random weights on purpose",
    "discriminator": "the discriminator retraining started from",
    # failures
    "traceback": "the error's traceback (error rows)",
}
