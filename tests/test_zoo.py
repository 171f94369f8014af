"""The demo zoo: a cached model is a function of its name, scale, recipe, data and seed."""
import torch

from tsdf_bench.models.zoo import get_model


def test_trained_model_does_not_depend_on_the_global_random_state():
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    attrs = (torch.rand(8, 5) > 0.5).float()
    data = (x, attrs, ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"])
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)  # whatever ran before must not change the model
        model = get_model("stargan", scale="smoke", train_data=data, progress=False, retrain=True, grid=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_model_plugins_own_their_demo_recipes():
    """Core knows no model by name: each plugin declares its demo_recipe, and the train command's
    default models are the plugins that have one."""
    from tsdf_bench.commands.train import trainable_models
    from tsdf_bench.models.zoo import DEFAULT_DEMO_RECIPE, recipe_for
    from tsdf_bench.plugins import get_registry

    reg = get_registry()
    assert set(trainable_models(reg)) == {"stargan", "attentiongan", "attgan", "hisd"}
    for name in trainable_models(reg):
        model = reg.create("model", name, scale="demo")
        assert recipe_for(name, "demo") == model.demo_recipe and model.demo_recipe != DEFAULT_DEMO_RECIPE
    assert recipe_for("hisd", "demo", steps=5)["steps"] == 5


def test_a_training_state_of_another_architecture_is_retrained_not_resumed(tmp_path, monkeypatch):
    """A finished training state saved for another architecture (same name, data and seed; e.g. the
    demo AttGAN's encoder normalisation changed) must not be resumed into a model whose manifest
    then claims the new architecture: the zoo trains afresh and says so."""
    import pytest

    from tsdf_bench.plugins import get_registry

    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    data = (x, (torch.rand(8, 13) > 0.5).float(), list(__import__("tsdf_bench.data._common", fromlist=["x"]).ATTGAN_ATTRS))
    reg = get_registry()
    real_create = reg.create

    def old_architecture(kind, name, **kw):  # the model as an earlier version built it
        model = real_create(kind, name, **kw)
        if kind == "model":
            model.config = {**model.config, "enc_norm": "old"}
            with torch.no_grad():  # and other weights
                next(model.parameters()).mul_(0.5)
        return model

    monkeypatch.setattr(reg, "create", old_architecture)
    old = get_model("attgan", scale="smoke", registry=reg, train_data=data, progress=False, grid=False, steps=3)
    monkeypatch.setattr(reg, "create", real_create)
    with pytest.warns(UserWarning, match="different training run.*training afresh"):
        new = get_model("attgan", scale="smoke", registry=reg, train_data=data, progress=False, grid=False, steps=3)
    fresh = get_model("attgan", scale="smoke", registry=reg, train_data=data, progress=False, grid=False, steps=3,
                      retrain=True)
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(new, fresh) and not same(new, old)  # exactly a fresh training, not the resumed old state
