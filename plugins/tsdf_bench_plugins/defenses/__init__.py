"""Built-in defenses, registered through the public hook like a third-party plugin.

One defense per module; each class docstring cites its paper and states its defaults.
"""
from tsdf_bench import DefenseEntry, hookimpl, lazy

_PKG = "tsdf_bench_plugins.defenses"


@hookimpl
def register_defenses(register):
    register(DefenseEntry("tsdf", "TSDF (TIFS 2026): universal interruption of generators plus masked poisoning of face detectors.",
                          lazy(f"{_PKG}.tsdf:TSDF")))
    register(DefenseEntry("cmua", "CMUA-Watermark (AAAI 2022): cross-model universal perturbation from per-model PGD.",
                          lazy(f"{_PKG}.cmua:CMUA")))
    register(DefenseEntry("found", "FOUND (TOMM 2024): universal perturbation from encoder and gradient ensembles.",
                          lazy(f"{_PKG}.found:FOUND")))
    register(DefenseEntry("pgd", "Per-image PGD against generators (Ruiz et al. 2020, joint over all targets).",
                          lazy(f"{_PKG}.pgd:PGD")))
    register(DefenseEntry("facepoison", "FacePoison (ICME 2023): per-image attack on face detectors' features.",
                          lazy(f"{_PKG}.facepoison:FacePoison")))
    register(DefenseEntry("noise", "Uniform random noise at the same budget (a control).",
                          lazy(f"{_PKG}.noise:UniformNoise")))
    register(DefenseEntry("none", "No protection (zero perturbation): the clean baseline.",
                          lazy(f"{_PKG}.none:NoDefense")))
