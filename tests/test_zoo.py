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
