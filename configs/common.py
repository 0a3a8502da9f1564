"""The paper's CIFAR-10 recipe (docs/theory.md §4-5), shared by the cifar10_* configs.

Training (official code): CIFAR ResNet-18, inputs in [0, 1] without normalisation, random
crop (pad 4) + horizontal flip, SGD momentum 0.9, weight decay 5e-4, batch 128, 200 epochs
(390 steps each: 78,000 steps), lr 0.025 divided by 10 at epochs 150 and 175
(`training.PAPER_SGD`: piecewise at 75% and 87.5%), the official conventions
(``official=True``) that the official strength grids are written in, 10 PGD steps.
Measurement: 201 test images, eps in {1.44, 2.64, 4.83, 8.86} (figure at 2.64), tangent
spaces from a 128-latent autoencoder's decoder Jacobian, alignment at noise 0.5 against a
learned score (1 - LPIPS and cosines).

Differences from the paper, stated: the learned score comes from pagjax's small
conditional convolutional denoiser (`pagjax.scores`), not an EDM diffusion model; the
paper's lower learning rate for the largest strengths is not applied (diverged models are
flagged and left out of the curves).

``smoke=True`` keeps every code path (ResNet-18, SGD schedule, augmentation, official
objective, conv autoencoder and denoiser, learned tangent spaces and scores, figures) but
swaps in tiny sizes and the offline digits (upsampled to 16x16), three strengths of the
grid and a few steps, so it runs on a CPU in CI in well under a minute.
"""
from __future__ import annotations

from pagjax import methods
from pagjax.experiment import LearnedConfig, SweepConfig
from pagjax.measure import MeasureConfig
from pagjax.training import PAPER_SGD, OptimizerConfig

CIFAR10_TRAIN = 50_000
BATCH = 128
EPOCHS = 200
PAPER_STEPS = EPOCHS * (CIFAR10_TRAIN // BATCH)  # 78,000
PAPER_EPS = (1.44, 2.64, 4.83, 8.86)

# The official 30-value strength grids (docs/theory.md §4; their units: docs/design.md §4),
# each method's "paper" grid in the registry (pagjax.methods).
GRIDS = methods.grid_table("paper")


def paper_config(method: str, smoke: bool) -> SweepConfig:
    """The paper's CIFAR-10 sweep of one method (or its CPU smoke variant)."""
    grid = methods.get(method, argument="paper_config method").grid("paper")
    if smoke:
        return SweepConfig(
            methods=(method,), strengths={method: (grid[0], grid[15], grid[-1])}, seeds=(0,),
            dataset="digits", dataset_kwargs={}, image_size=16, n_train=256, n_test=64,
            model="resnet18:width=4", steps=2, batch_size=16, official=True, pgd_steps=2, augment="crop_flip",
            optimizer=OptimizerConfig(name="sgd", learning_rate=0.025, momentum=0.9, weight_decay=5e-4,
                                      schedule="piecewise"),
            measure=MeasureConfig(eps=PAPER_EPS, regime_eps=2.64, num_eval=8, num_directions=1, align_noise=0.5,
                                  lpips=False, grid_images=3),
            learned=LearnedConfig(ae_latent=8, ae_arch="conv", ae_features=(4,), ae_steps=3,
                                  den_arch="conv", den_width=8, den_depth=1, den_steps=3),
            steps_per_call=2, checkpoint_every=2,
        )
    return SweepConfig(
        methods=(method,), strengths={method: grid}, seeds=(0,),
        dataset="cifar10", dataset_kwargs={}, n_train=CIFAR10_TRAIN, n_test=10_000,
        model="resnet18", steps=PAPER_STEPS, batch_size=BATCH, optimizer=PAPER_SGD, official=True,
        pgd_steps=10, smoothness_noise_std=0.1, augment="crop_flip",
        measure=MeasureConfig(eps=PAPER_EPS, regime_eps=2.64, num_eval=201, num_directions=4, align_noise=0.5,
                              lpips=True, lpips_images=201, grid_images=8),
        learned=LearnedConfig(ae_latent=128, ae_arch="conv", ae_features=(64, 128), ae_steps=20_000, ae_lr=1e-3,
                              den_arch="conv", den_width=128, den_depth=4, den_steps=50_000, den_lr=2e-4,
                              basis_method="cholesky"),
        steps_per_call=500, checkpoint_every=2000,
    )
