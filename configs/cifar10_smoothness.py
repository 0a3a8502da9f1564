"""CIFAR-10, smoothness penalty (logit distance under N(0, 0.1^2) input noise): lam in logspace(-4, 4, 30).

Run:      python -m experiments.run_config configs/cifar10_smoothness.py --data-dir ~/tensorflow_datasets
          (prepare CIFAR-10 first on a machine with network: python -m pagjax.data download cifar10)
Smoke:    python -m experiments.run_config configs/cifar10_smoothness.py --smoke   (CPU, offline digits, < 1 min)
Hardware: one GPU (H100/A100) or a Colab TPU; add --strategy loop if 30 vmapped ResNet-18s do not fit in memory.
Expect:   the same weak -> Bayes-aligned -> excessive sequence as the other methods (docs/theory.md §3);
          the paper's Figure 3 does not give numbers for this method.
Cost:     two forward passes per step: ~1.5 accelerator-hours per model, ~45 H100-hours for the 30
          models (estimate, not measured).
"""
from configs.common import paper_config


def get_config(smoke: bool = False):
    """The paper's smoothness-penalty sweep (or its CPU smoke variant)."""
    return paper_config("smoothness", smoke)
