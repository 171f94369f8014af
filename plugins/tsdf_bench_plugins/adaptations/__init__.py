"""Built-in adaptations, registered through the public hook like a third-party plugin."""
from tsdf_bench import AdaptationEntry, hookimpl, lazy

_P = "tsdf_bench_plugins.adaptations"


@hookimpl
def register_adaptations(register):
    register(AdaptationEntry("retrain", "Fine-tune the model on the crops collected from protected images (TSDF).",
                             lazy(f"{_P}.retrain:RetrainAdaptation")))
    register(AdaptationEntry("retrain-aligned", "The detector-free scenario: retrain on pre-aligned faces (no face "
                             "detection, so poisoning cannot starve the attacker).",
                             lazy(f"{_P}.retrain:AlignedRetrainAdaptation")))
    register(AdaptationEntry("none", "No adaptation: protected images go to the original model as they are.",
                             lazy(f"{_P}.purify:NoAdaptation")))
    register(AdaptationEntry("jpeg", "Purify inputs by JPEG re-compression (quality 75).",
                             lazy(f"{_P}.purify:JpegPurification")))
    register(AdaptationEntry("blur", "Purify inputs by Gaussian blur (sigma 1.0).",
                             lazy(f"{_P}.purify:BlurPurification")))
    register(AdaptationEntry("resize", "Purify inputs by down-up resizing (factor 0.5).",
                             lazy(f"{_P}.purify:ResizePurification")))
    register(AdaptationEntry("noise", "Purify inputs by adding Gaussian noise (std 0.05).",
                             lazy(f"{_P}.purify:NoisePurification")))
    register(AdaptationEntry("salt-pepper", "Purify inputs by salt-and-pepper noise (amount 0.01, PDB's per-element draw).",
                             lazy(f"{_P}.purify:SaltPepperPurification")))
    register(AdaptationEntry("lora-patch", "LoRA Patching (Qu et al. 2025): train gated low-rank adapters on the generator "
                             "against PGD-protected inputs, base weights frozen.",
                             lazy(f"{_P}.lora_patch:LoRAPatchAdaptation")))
