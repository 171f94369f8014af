"""Run configs: TOML -> dataclasses, key checking with closest-match hints, names, hashing."""
from pathlib import Path

import pytest

from tsdf_bench.config import check_names, load_config, to_toml
from tsdf_bench.errors import ConfigError, UnknownNameError
from tsdf_bench.plugins import Registry

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).parent / "harness_fakes"

MINIMAL = """
[run]
name = "t"
scale = "smoke"
seeds = [0, 1]

[models]
names = ["fake-gan"]

[defenses]
names = ["fake-shift"]
eps = 0.04

[defenses.fake-shift]
strength = 0.5
"""


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_resolves_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.run.seeds == [0, 1] and cfg.run.rounds == 1 and cfg.run.output == "runs"
    assert cfg.data.source == "embedded" and cfg.adaptations.names == ["retrain"]
    assert cfg.detectors.attacker == "mtcnn"
    assert cfg.defenses.options_for("fake-shift") == {"eps": 0.04, "strength": 0.5}
    assert cfg.defenses.options_for("other") == {"eps": 0.04}


def test_typo_key_names_table_and_closest_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL.replace("seeds =", "seed =")))
    msg = str(err.value)
    assert "'seed'" in msg and "[run]" in msg and "Did you mean 'seeds'" in msg
    with pytest.raises(ConfigError, match=r"\[data\].*Did you mean 'n_collect'"):
        load_config(write(tmp_path, MINIMAL + "\n[data]\nn_colect = 3\n"))


def test_unknown_table_and_options_for_unlisted_plugin(tmp_path):
    with pytest.raises(ConfigError, match="unknown table \\[defences\\].*Did you mean 'defenses'"):
        load_config(write(tmp_path, MINIMAL + "\n[defences]\nnames = ['x']\n"))
    with pytest.raises(ConfigError, match=r"\[defenses.fake-shif\].*Did you mean 'fake-shift'"):
        load_config(write(tmp_path, MINIMAL + "\n[defenses.fake-shif]\nstrength = 1\n"))


@pytest.mark.parametrize("text, match", [
    ('[run]\nseeds = "0"\n', "seeds must be a list"),
    ('[run]\nscale = "huge"\n', "scale = 'huge'"),
    ('[run]\ndevice = "tpu"\n', "device = 'tpu'"),
    ('[run]\nrounds = -1\n', "rounds = -1"),
    ('[data]\nsource = "celeba"\n', "needs path"),
    ('[data]\nn_eval = 0\n', "n_eval must be >= 1"),
])
def test_bad_values(tmp_path, text, match):
    base = '[models]\nnames = ["fake-gan"]\n[defenses]\nnames = ["fake-shift"]\n'
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, base + text))


def test_missing_required_names_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"\[defenses\] needs a non-empty names"):
        load_config(write(tmp_path, '[models]\nnames = ["a"]\n'))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[run\n"))


def test_unknown_plugin_name_uses_registry_error(tmp_path):
    registry = Registry(plugins_dirs=[FAKES], entry_points=False)
    cfg = load_config(write(tmp_path, MINIMAL.replace('names = ["fake-shift"]', 'names = ["fake-shfit"]')
                            .replace("[defenses.fake-shift]\nstrength = 0.5\n", "")
                            + '\n[detectors]\nattacker = "fake-det"\n[adaptations]\nnames = ["fake-retrain"]\n'
                            '[metrics]\nnames = ["fake-metric"]\n'))
    with pytest.raises(UnknownNameError) as err:
        check_names(cfg, registry)
    assert "fake-shift" in str(err.value) and "Did you mean" in str(err.value)


def test_hash_ignores_output_and_changes_with_content(tmp_path):
    a = load_config(write(tmp_path, MINIMAL))
    b = a.replace(run__output="elsewhere", run__publish="pub")
    c = a.replace(defenses__eps=0.03)
    assert a.hash == b.hash and len(a.hash) == 64
    assert a.hash != c.hash


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    again = load_config(write(tmp_path, to_toml(cfg), "resolved.toml"))
    assert again.hash == cfg.hash
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", ["demo.toml", "paper.toml", "smoke.toml", "tsdf-ablation.toml",
                                  "poison-retinaface.toml", "field.toml", "poisoning.toml", "demo-full.toml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    from tsdf_bench.harness.plan import check_options
    from tsdf_bench.plugins import get_registry

    check_names(cfg, get_registry())
    check_options(cfg, get_registry())  # every option of every table is one its plugin takes
    assert cfg.run.scale == name.split(".")[0] or name in ("tsdf-ablation.toml", "poison-retinaface.toml",
                                                           "field.toml", "poisoning.toml", "demo-full.toml")
    if name == "field.toml":  # PDB's eight transforms, both detector-free attackers, the TE variants
        purifications = [a for a in cfg.adaptations.names if cfg.adaptations.plugin_for(a) not in
                         ("retrain", "retrain-aligned", "lora-patch")]
        assert len(purifications) == 8 and cfg.adaptations.plugin_for("retrain-aligned") == "retrain-aligned"
        assert {"cmua-from-stargan", "cmua-from-attentiongan"} <= set(cfg.defenses.names)
    if name == "tsdf-ablation.toml":
        assert {cfg.defenses.plugin_for(d) for d in cfg.defenses.names} == {"tsdf"}
        assert "plugin" not in cfg.defenses.options_for("tsdf-poison-only")
    if name == "poison-retinaface.toml":  # the poisons attack the attacker's own detector, and only it
        assert cfg.detectors.attacker == "retinaface" and cfg.white_box_detectors({}) == ["retinaface"]
        assert cfg.defenses.options_for("tsdf-poison-only")["mask"] is False
    if name == "demo.toml":  # the 15-minute subset: 3 seeds, the models' framing, both cores
        assert cfg.defenses.names == ["tsdf", "cmua", "found", "pgd", "none"]
        assert cfg.models.names == ["stargan", "attgan"] and len(cfg.run.seeds) == 3
        assert cfg.detectors.crop == "frame" and cfg.run.workers == 2
    if name == "demo-full.toml":  # every built-in defense and all four models
        assert cfg.defenses.names == ["tsdf", "cmua", "found", "pgd", "facepoison", "noise", "none"]
        assert cfg.models.names == ["stargan", "attentiongan", "attgan", "hisd"]
    if name == "paper.toml":
        assert cfg.models.names == ["stargan", "attentiongan", "attgan", "hisd"]
        assert cfg.detectors.attacker == "mtcnn" and cfg.adaptations.names == ["retrain"] and cfg.run.rounds == 1


@pytest.mark.parametrize("name", ["demo.toml", "paper.toml", "smoke.toml"])
def test_shipped_configs_match_the_builtin_plugins(name):
    """Every plugin name and option of the shipped configs exists (nothing heavy is built)."""
    from tsdf_bench.harness.plan import check_options

    registry = Registry()
    cfg = load_config(ROOT / "configs" / name)
    check_names(cfg, registry)
    check_options(cfg, registry)


PATHS = """
[run]
scale = "paper"

[data]
source = "celeba"
path = "data/celeba"
attr_csv = "labels.csv"

[models]
names = ["stargan", "hisd"]

[models.stargan]
checkpoint = "ckpt/200000-G.ckpt"

[models.hisd]
checkpoint = "~/hisd/gen_00600000.pt"
reference = "$TSDF_TEST_REFS/reference_glasses_2.jpg"
discriminator_checkpoint = "${TSDF_TEST_REFS}/dis.pt"

[defenses]
names = ["none"]

[detectors]
names = ["s3fd"]

[detectors.s3fd]
checkpoint = "../weights/s3fd.pth"
score_threshold = 0.5
"""


def test_paths_resolve_against_the_config_folder_with_home_and_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_TEST_REFS", str(tmp_path / "refs"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "paper.toml").write_text(PATHS)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/paper.toml")  # a relative config path, from another cwd
    assert cfg.data.path == str(folder / "data" / "celeba")
    assert cfg.data.attr_csv == str(folder / "data" / "celeba" / "labels.csv")  # not beside the config: in path
    assert cfg.models.options["stargan"]["checkpoint"] == str(folder / "ckpt" / "200000-G.ckpt")
    hisd = cfg.models.options["hisd"]
    assert hisd["checkpoint"] == str(tmp_path / "home" / "hisd" / "gen_00600000.pt")
    assert hisd["reference"] == str(tmp_path / "refs" / "reference_glasses_2.jpg")
    assert hisd["discriminator_checkpoint"] == str(tmp_path / "refs" / "dis.pt")
    assert cfg.detectors.options["s3fd"] == {"checkpoint": str(tmp_path / "weights" / "s3fd.pth"),
                                             "score_threshold": 0.5}
    assert cfg.run.output == "runs"  # an output location, not an input: stays as written
    # a labels file beside the config wins over the data folder
    (folder / "labels.csv").write_text("path,Young\n")
    assert load_config(folder / "paper.toml").data.attr_csv == str(folder / "labels.csv")
    # the stored copy (absolute paths) reads back the same from anywhere
    stored = tmp_path / "elsewhere" / "config.toml"
    stored.parent.mkdir()
    stored.write_text(to_toml(cfg))
    again = load_config(stored)
    assert again.to_dict() == cfg.to_dict() and again.hash == cfg.hash


def test_dict_config_paths_resolve_against_the_cwd(tmp_path, monkeypatch):
    from tsdf_bench.config import from_dict

    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"data": {"source": "folder", "path": "photos"}, "models": {"names": ["hisd"], "hisd": {
        "reference": "ref.jpg", "steps": 3}}, "defenses": {"names": ["none"]}})
    assert cfg.data.path == str(tmp_path / "photos")
    assert cfg.models.options["hisd"] == {"reference": str(tmp_path / "ref.jpg"), "steps": 3}
    assert cfg.replace(run__device="cpu").data.path == str(tmp_path / "photos")


def test_unset_variable_in_a_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TSDF_TEST_NOPE", raising=False)
    path = tmp_path / "c.toml"
    path.write_text(PATHS.replace("${TSDF_TEST_REFS}", "$TSDF_TEST_NOPE").replace("$TSDF_TEST_REFS", "/r"))
    with pytest.raises(ConfigError, match=r"\[models.hisd\] discriminator_checkpoint .* uses \$TSDF_TEST_NOPE, "
                                          r"which is not set"):
        load_config(path)


def test_check_files_option_is_validated_and_not_hashed(tmp_path):
    base = PATHS.replace("$TSDF_TEST_REFS", "/r").replace("${TSDF_TEST_REFS}", "/r")
    path = tmp_path / "c.toml"
    path.write_text(base)
    default = load_config(path)
    assert default.data.check_files == "used"
    path.write_text(base.replace('attr_csv = "labels.csv"', 'attr_csv = "labels.csv"\ncheck_files = "all"'))
    full = load_config(path)
    assert full.data.check_files == "all" and full.hash == default.hash
    path.write_text(base.replace('attr_csv = "labels.csv"', 'check_files = "some"'))
    with pytest.raises(ConfigError, match=r'check_files = .some.; use "used"'):
        load_config(path)


def test_sweeps_expand_into_named_variants_and_bad_sweeps_are_named():
    from tsdf_bench.config import from_dict

    base = {"models": {"names": ["stargan"]}, "defenses": {"names": ["none"]}}
    cfg = from_dict({**base, "adaptations": {"names": ["blur"], "blur": {"sweep": {"kernel_size": [1, 3]}, "sigma": 1.0}}})
    assert cfg.adaptations.names == ["blur-kernel_size1", "blur-kernel_size3"]
    assert cfg.adaptations.plugin_for("blur-kernel_size3") == "blur"
    assert cfg.adaptations.options_for("blur-kernel_size3") == {"kernel_size": 3, "sigma": 1.0}
    with pytest.raises(ConfigError, match=r"\[adaptations.blur\] sweep must be a table of non-empty value lists"):
        from_dict({**base, "adaptations": {"names": ["blur"], "blur": {"sweep": {"kernel_size": 3}}}})


def test_transfer_adds_one_variant_per_defense_and_source_model():
    from tsdf_bench.config import from_dict

    cfg = from_dict({"models": {"names": ["stargan", "attgan"]}, "defenses": {"names": ["cmua", "none"],
                     "cmua": {"iterations": 2}}, "transfer": {"sources": "all", "defenses": ["cmua"]}})
    assert cfg.defenses.names == ["cmua", "none", "cmua-from-stargan", "cmua-from-attgan"]
    assert cfg.defenses.plugin_for("cmua-from-attgan") == "cmua"
    assert cfg.defenses.fit_models_for("cmua-from-attgan") == ["attgan"] and cfg.defenses.fit_models_for("cmua") is None
    assert cfg.defenses.options_for("cmua-from-attgan") == {"eps": 0.05, "iterations": 2}  # runner keys popped
    with pytest.raises(ConfigError, match=r"\[transfer\] sources"):
        from_dict({"models": {"names": ["stargan"]}, "defenses": {"names": ["cmua"]}, "transfer": {"sources": ["hisd"]}})
    with pytest.raises(ConfigError, match=r"fit_models \['hisd'\] are not in \[models\] names"):
        from_dict({"models": {"names": ["stargan"]}, "defenses": {"names": ["cmua"], "cmua": {"fit_models": ["hisd"]}}})
