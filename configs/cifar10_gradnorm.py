"""CIFAR-10, gradient-norm penalty: official constant c in logspace(-5, 2, 30) (lam = c * 1e5 / 128^2).

Run:      python -m experiments.run_config configs/cifar10_gradnorm.py --data-dir ~/tensorflow_datasets
          (prepare CIFAR-10 first on a machine with network: python -m pagjax.data download cifar10)
Smoke:    python -m experiments.run_config configs/cifar10_gradnorm.py --smoke   (CPU, offline digits, < 1 min)
Hardware: one GPU (H100/A100) or a Colab TPU; add --strategy loop if 30 vmapped ResNet-18s do not fit in memory.
Expect:   docs/theory.md §7: on/off change about 0.5 / 1.1 for the weakest models, crossover near
          c = 0.02, alignment peak about 0.87 (1 - LPIPS) for c in 0.04-0.2 at accuracy 0.75-0.89,
          accuracy falling above c = 0.5.
Cost:     double backpropagation costs about 3x a plain step: ~3 accelerator-hours per model,
          ~90 H100-hours for the 30 models (estimate, not measured).
"""
from configs.common import paper_config


def get_config(smoke: bool = False):
    """The paper's gradient-norm sweep (or its CPU smoke variant)."""
    return paper_config("gradnorm", smoke)
