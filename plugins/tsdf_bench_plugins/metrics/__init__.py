"""Built-in metrics, registered through the public hook like a third-party plugin."""
from tsdf_bench import MetricEntry, hookimpl, lazy

_P = "tsdf_bench_plugins.metrics"


@hookimpl
def register_metrics(register):
    register(MetricEntry("forgery", "Forgery interruption: L2_mask/SR_mask (CMUA), Ruiz MSE/SR, output PSNR/SSIM.",
                         lazy(f"{_P}.forgery:ForgeryMetric")))
    register(MetricEntry("invisibility", "Invisibility of the perturbation: input PSNR/SSIM, L-inf and L2 of W.",
                         lazy(f"{_P}.invisibility:InvisibilityMetric")))
    register(MetricEntry("detection", "Detector poisoning per detector: precision, recall, F1, DUQ (TSDF protocol).",
                         lazy(f"{_P}.detection:DetectionMetric")))
    register(MetricEntry("crop_yield", "Share of protected images the attacker still gets a usable face crop from.",
                         lazy(f"{_P}.prep_yield:CropYieldMetric")))
    register(MetricEntry("retrained_clean_mse", "How far retraining moved the model: MSE of its clean forgeries vs "
                         "the original model's.", lazy(f"{_P}.drift:RetrainedCleanMseMetric")))
    register(MetricEntry("identity", "Identity disruption, CIDR-style (PDB): dlib ResNet face embeddings of x, G(x), G(x+W).",
                         lazy(f"{_P}.identity:IdentityMetric")))
    register(MetricEntry("lpips", "LPIPS of G(x+W) vs G(x) and x+W vs x (lpips package, local backbone weights only).",
                         lazy(f"{_P}.perceptual:LpipsMetric")))
