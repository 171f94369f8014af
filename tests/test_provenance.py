"""git_state: a row's commit and dirty flag say whether the commit alone reproduces the run."""
import subprocess

import pytest

from tsdf_bench.harness.provenance import git_state


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "config.toml").write_text("seed = 0\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_clean_tree_is_clean_at_its_commit(repo):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_state(str(repo)) == {"git_commit": head, "git_dirty": False}


def test_modified_tracked_file_is_dirty(repo):
    (repo / "config.toml").write_text("seed = 1\n")
    assert git_state(str(repo))["git_dirty"] is True


def test_untracked_file_is_dirty_but_ignored_outputs_are_not(repo):
    (repo / "runs").mkdir()
    (repo / "runs" / "results.sqlite").write_bytes(b"x")
    assert git_state(str(repo))["git_dirty"] is False
    (repo / "new-config.toml").write_text("seed = 2\n")  # a config the commit lacks
    assert git_state(str(repo))["git_dirty"] is True


def test_outside_a_repository_says_unknown(tmp_path):
    assert git_state(str(tmp_path)) == {"git_commit": None, "git_dirty": None}


def test_versions_name_the_cpu_and_the_simd_level_torch_uses():
    import os

    import torch

    from tsdf_bench.harness.provenance import versions

    v = versions()
    assert v["cpu"]
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name and the generation's numbers
        assert "family" in v["cpu"] and "model" in v["cpu"]
    assert v["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
