"""The independent attribute classifier and edit_report's use of it."""
import pytest
import torch

from tsdf_bench.errors import ConfigError
from tsdf_bench.models import zoo
from tsdf_bench.models.edit_check import train_attribute_classifier
from tsdf_bench_plugins.models.hisd import HiSD


def _bright_dark(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    bright = torch.rand(n, generator=g) < 0.5
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.4 + torch.where(bright, 0.5, -0.9)[:, None, None, None]
    return x.clamp(-1, 1), bright.float()[:, None]


def test_classifier_learns_a_visible_attribute():
    x, a = _bright_dark()
    clf = train_attribute_classifier(x, a, steps=40)
    xt, at = _bright_dark(seed=1)
    with torch.no_grad():
        acc = ((clf(xt) > 0).float() == at).float().mean()
    assert acc > 0.9 and not clf.training
    with pytest.raises(ConfigError, match=r"\[N, A\]"):
        train_attribute_classifier(x, a[:3])


def test_edit_report_scores_hisd_with_a_classifier():
    model = HiSD("smoke")
    model.config["edit"] = (2, 1)  # score a hair-colour edit on a smoke model
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    always_blond = lambda z: torch.full((z.shape[0], 7), -5.0).index_fill_(1, torch.tensor([3]), 5.0)  # noqa: E731
    report = zoo.edit_report(model, None, x, torch.zeros(4, 7), classifier=always_blond)
    (row,) = report["per_target"]
    assert row["attribute"] == "Blond_Hair" and row["cls_acc_edited"] == 1.0 and row["mean_abs_change"] > 0
    with pytest.raises(ConfigError, match="classifier="):
        zoo.edit_report(model, None, x, torch.zeros(4, 7))
