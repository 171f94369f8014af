"""Built-in models, registered through the public hook like a third-party plugin.

Every factory takes ``scale="demo"`` ("paper", "demo" or "smoke") and ``checkpoint=None`` (an
official generator file at paper scale, or a tsdf-bench checkpoint at any scale).  Trained demo
models come from :func:`tsdf_bench.models.zoo.get_model`.
"""
from tsdf_bench import ModelEntry, hookimpl, lazy


@hookimpl
def register_models(register):
    register(ModelEntry("stargan", "StarGAN (Choi et al., CVPR 2018): 5 CelebA attribute edits, WGAN-GP.",
                        lazy("tsdf_bench_plugins.models.stargan:StarGAN")))
    register(ModelEntry("attentiongan", "AttentionGAN-v1 multi-domain (Tang et al., TNNLS 2021): StarGAN with an attention mask.",
                        lazy("tsdf_bench_plugins.models.attentiongan:AttentionGAN")))
    register(ModelEntry("attgan", "AttGAN (He et al., TIP 2019): 13 CelebA attributes, encoder-decoder with shortcut.",
                        lazy("tsdf_bench_plugins.models.attgan:AttGAN")))
    register(ModelEntry("hisd", "HiSD (Li et al., CVPR 2021): hierarchical style disentanglement, add glasses from a reference.",
                        lazy("tsdf_bench_plugins.models.hisd:HiSD")))
