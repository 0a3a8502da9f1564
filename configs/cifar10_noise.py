"""CIFAR-10, randomized smoothing / Gaussian noise augmentation: s in logspace(-3, 2, 30).

Run:      python -m experiments.run_config configs/cifar10_noise.py --data-dir ~/tensorflow_datasets
          (prepare CIFAR-10 first on a machine with network: python -m pagjax.data download cifar10)
Smoke:    python -m experiments.run_config configs/cifar10_noise.py --smoke   (CPU, offline digits, < 1 min)
Hardware: one GPU (H100/A100) or a Colab TPU; add --strategy loop if 30 vmapped ResNet-18s do not fit in memory.
Expect:   docs/theory.md §7: off-manifold change about 1.1 vs on about 0.5 for the weakest models, the
          off/on crossover near s = 0.07, alignment peaking near s = 0.1 at accuracy 0.87-0.90, accuracy
          falling above s = 0.5.
Cost:     about 1 accelerator-hour per model (78,000 ResNet-18 steps at batch 128), 30 models: ~30 H100-hours
          (estimate, not measured), plus ~1 h for the autoencoder, the denoiser and the measurements.
"""
from configs.common import paper_config


def get_config(smoke: bool = False):
    """The paper's noise-augmentation sweep (or its CPU smoke variant)."""
    return paper_config("noise", smoke)
