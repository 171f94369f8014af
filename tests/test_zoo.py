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
