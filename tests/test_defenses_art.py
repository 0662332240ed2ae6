"""Our defenses against ART's, where ART has them: same data, same budget, our robust accuracy must
not be worse. ART's TRADES trainer has two limitations we steer around (and demonstrate).

Tolerance: robust accuracy after a short training run moves by about ±3 points from one training
seed to the next (we measured 0.44–0.53 for both trainers at 8 epochs over seeds 0–5). We compare
means over three seeds, evaluated on the whole digits test split (450 examples) with the same PGD-20,
and allow 2 points: a real regression (a weaker inner attack, a wrong projection) costs far more
than that, while seed noise of a 3-seed mean stays near it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.base import Victim, predict
from attacks.pgd import PGD
from bench.foundation.keys import seed_everything
from bench.foundation.models import build_model
from bench.foundation.registry import DEFENSES
from defenses.bit_depth import quantize
from tests.conftest import train_defense

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
EPOCHS = 8
TRADES_EPOCHS = 12
TOLERANCE = 0.02
EPS = 0.2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny 8×8 models gain nothing from intra-op threads, and on a loaded shared CPU they lose a lot:
    we measured one ART FGSM-training seed at 6 s with one thread and 132 s with torch's default two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _robust_accuracy(model: nn.Module, digits, norm: str = "linf", eps: float = EPS) -> float:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x, y = digits.x_test, digits.y_test
    seed_everything(0)
    x_adv = PGD(eps, norm=norm, steps=20)(Victim(model, 10), x, y)
    return float((predict(model, x_adv) == y).float().mean())


def _art_classifier(model: nn.Module, optimizer: torch.optim.Optimizer):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def _ours(
    defense_id: str, digits, eval_norm: str = "linf", eval_eps: float = EPS, epochs: int = EPOCHS, **overrides
) -> float:
    return float(
        np.mean(
            [
                _robust_accuracy(
                    train_defense(defense_id, digits, epochs, s, **overrides).model, digits, eval_norm, eval_eps
                )
                for s in SEEDS
            ]
        )
    )


def _art_scores(train_one, digits, norm: str = "linf", eps: float = EPS) -> list[float]:
    """ART's robust accuracy per seed: ``train_one(model)`` trains a fresh model (same initial weights
    as ours for the same seed) through ART."""
    scores = []
    for seed in SEEDS:
        seed_everything(seed)
        model = build_model("digits", (1, 8, 8), 10)
        train_one(model)
        scores.append(_robust_accuracy(model, digits, norm, eps))
    return scores


def test_pgd_adversarial_training_is_not_worse_than_art_madry(digits):
    """ART's AdversarialTrainerMadryPGD, given the budget of ``pgd-at-linf-v1`` on digits explicitly
    (its defaults are CIFAR-10 on the 0-255 scale: eps 8, step 2)."""
    from art.defences.trainer import AdversarialTrainerMadryPGD

    ours = DEFENSES.get("pgd-at-linf-v1").resolve_kwargs("digits")
    art_scores = []
    for seed in SEEDS:
        seed_everything(seed)
        model = build_model("digits", (1, 8, 8), 10)
        classifier = _art_classifier(model, torch.optim.Adam(model.parameters(), lr=ours["lr"]))
        trainer = AdversarialTrainerMadryPGD(
            classifier,
            nb_epochs=EPOCHS,
            batch_size=ours["batch_size"],
            eps=ours["eps"],
            eps_step=ours["eps"] * ours["rel_step"],
            max_iter=ours["steps"],
            num_random_init=1,
        )
        trainer.fit(digits.x_train.numpy(), digits.y_train.numpy())
        art_scores.append(_robust_accuracy(model, digits))
    ours_score = _ours("pgd-at-linf-v1", digits)
    print(f"robust accuracy at linf {EPS}: ours {ours_score:.3f}, ART {np.mean(art_scores):.3f} {art_scores}")
    assert ours_score >= float(np.mean(art_scores)) - TOLERANCE


def test_fast_adversarial_training_is_not_worse_than_art_fbf(digits):
    """ART's AdversarialTrainerFBFPyTorch (Wong et al.'s FGSM with random start, step 1.25 eps). It
    imposes its own schedule — a cyclic learning rate peaking at 0.21, written for SGD — and gradient
    clipping, so it gets an SGD optimizer; it needs one-hot labels."""
    from art.defences.trainer import AdversarialTrainerFBFPyTorch

    art_scores = []
    for seed in SEEDS:
        seed_everything(seed)
        model = build_model("digits", (1, 8, 8), 10)
        classifier = _art_classifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        trainer = AdversarialTrainerFBFPyTorch(classifier, eps=EPS)
        one_hot = np.eye(10, dtype=np.float32)[digits.y_train.numpy()]
        trainer.fit(digits.x_train.numpy(), one_hot, nb_epochs=EPOCHS, batch_size=64)
        art_scores.append(_robust_accuracy(model, digits))
    ours_score = _ours("fast-at-linf-v1", digits)
    print(f"robust accuracy at linf {EPS}: ours {ours_score:.3f}, ART {np.mean(art_scores):.3f} {art_scores}")
    assert ours_score >= float(np.mean(art_scores)) - TOLERANCE


def test_trades_is_not_worse_than_art_trades(digits):
    """ART's AdversarialTrainerTRADESPyTorch at the budget of ``trades-linf-v1`` on digits (eps, 5
    steps of 0.5·eps, β = 6, Adam, batch 64). One difference is ART's by design: its inner
    maximization is the attack it is given — cross-entropy PGD here, started at x (TRADES starts at
    x + 0.001·N(0, I) and ascends the KL) — so this checks ours against a CE-PGD variant of TRADES.
    The model is not an ``nn.Sequential`` and no scheduler is passed (see the next test).

    Both train TRADES_EPOCHS, not EPOCHS: the KL is nearly flat around a fresh model, so the paper's
    inner maximization starts slower than CE-PGD — measured on the 16-channel digits CNN at 8
    epochs, ours 0.421 vs ART 0.460 (seeds 0-2); at 12, 0.496 vs 0.503 (the default trains 20)."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.defences.trainer import AdversarialTrainerTRADESPyTorch

    ours = DEFENSES.get("trades-linf-v1").resolve_kwargs("digits")

    def train_one(model: nn.Module) -> None:
        classifier = _art_classifier(model, torch.optim.Adam(model.parameters(), lr=ours["lr"]))
        attack = ProjectedGradientDescentPyTorch(
            classifier,
            norm=np.inf,
            eps=ours["eps"],
            eps_step=ours["eps"] * ours["rel_step"],
            max_iter=ours["steps"],
            num_random_init=0,
            batch_size=ours["batch_size"],
            verbose=False,
        )
        trainer = AdversarialTrainerTRADESPyTorch(classifier, attack, beta=ours["beta"])
        x, y = digits.x_train.numpy(), digits.y_train.numpy()
        trainer.fit(x, y, nb_epochs=TRADES_EPOCHS, batch_size=ours["batch_size"])

    art_scores = _art_scores(train_one, digits)
    ours_score = _ours("trades-linf-v1", digits, epochs=TRADES_EPOCHS)
    print(f"robust accuracy at linf {EPS}: ours {ours_score:.3f}, ART {np.mean(art_scores):.3f} {art_scores}")
    assert ours_score >= float(np.mean(art_scores)) - TOLERANCE


def test_fgsm_adversarial_training_is_not_worse_than_art_adversarial_trainer(digits):
    """ART's AdversarialTrainer with FastGradientMethod (from the clean point, step eps) on every
    example of every batch (ratio 1) — ``fgsm-at-linf-v1``'s method and budget."""
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer

    ours = DEFENSES.get("fgsm-at-linf-v1").resolve_kwargs("digits")
    assert not ours["random_start"]

    def train_one(model: nn.Module) -> None:
        classifier = _art_classifier(model, torch.optim.Adam(model.parameters(), lr=ours["lr"]))
        attack = FastGradientMethod(
            classifier, norm=np.inf, eps=ours["eps"], eps_step=ours["eps"] * ours["rel_step"], batch_size=64
        )
        trainer = AdversarialTrainer(classifier, attack, ratio=1.0)
        trainer.fit(digits.x_train.numpy(), digits.y_train.numpy(), nb_epochs=EPOCHS, batch_size=ours["batch_size"])

    art_scores = _art_scores(train_one, digits)
    ours_score = _ours("fgsm-at-linf-v1", digits)
    print(f"robust accuracy at linf {EPS}: ours {ours_score:.3f}, ART {np.mean(art_scores):.3f} {art_scores}")
    assert ours_score >= float(np.mean(art_scores)) - TOLERANCE


L2_EPS = 1.0


def test_l2_pgd_adversarial_training_is_not_worse_than_art_adversarial_trainer(digits):
    """ART's AdversarialTrainer with L2 ProjectedGradientDescentPyTorch (random start, last iterate)
    on every example (ratio 1) — ``pgd-at-l2-v1``'s method and budget, except that both train at
    eps 1.0 instead of the default 1.5: at 1.5 and 8 epochs either trainer sometimes stays at chance
    level for the whole run (we saw it for 2 of 12 seeds of ours and 1 of 12 of ART's), which would
    make a 3-seed mean meaningless; at 1.0 both learn on every seed. Evaluated with L2 PGD-20 at 1.0."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.defences.trainer import AdversarialTrainer

    ours = DEFENSES.get("pgd-at-l2-v1").resolve_kwargs("digits", {"eps": L2_EPS})

    def train_one(model: nn.Module) -> None:
        classifier = _art_classifier(model, torch.optim.Adam(model.parameters(), lr=ours["lr"]))
        attack = ProjectedGradientDescentPyTorch(
            classifier,
            norm=2,
            eps=ours["eps"],
            eps_step=ours["eps"] * ours["rel_step"],
            max_iter=ours["steps"],
            num_random_init=1,
            batch_size=ours["batch_size"],
            verbose=False,
        )
        trainer = AdversarialTrainer(classifier, attack, ratio=1.0)
        trainer.fit(digits.x_train.numpy(), digits.y_train.numpy(), nb_epochs=EPOCHS, batch_size=ours["batch_size"])

    art_scores = _art_scores(train_one, digits, "l2", L2_EPS)
    ours_score = _ours("pgd-at-l2-v1", digits, "l2", L2_EPS, eps=L2_EPS)
    print(f"robust accuracy at l2 {L2_EPS}: ours {ours_score:.3f}, ART {np.mean(art_scores):.3f} {art_scores}")
    assert ours_score >= float(np.mean(art_scores)) - TOLERANCE


def test_art_trades_trainer_limitations():
    """What the TRADES cross-check steers around (ART 1.20.1, torch 2). Neither stops ART's trainer
    from training a model that is not an ``nn.Sequential`` without a scheduler:

    - its train-accuracy bookkeeping reads ``model_outputs_pert[0]``: for an ``nn.Sequential``
      (whose every layer output ART's wrapper returns) that is the first layer's output, not the
      logits, and the comparison with the labels crashes. The loss itself uses ``[-1]``, the logits.
    - a scheduler, if one is passed, must be an ``_LRScheduler``; torch-2 schedulers derive from
      ``LRScheduler`` and are refused.

    If ART fixes these, this test fails: then drop it and the README caveat."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.defences.trainer import AdversarialTrainerTRADESPyTorch

    x = np.random.RandomState(0).rand(32, 1, 8, 8).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(32) % 10]

    def trainer(model: nn.Module):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        classifier = _art_classifier(model, optimizer)
        attack = ProjectedGradientDescent(classifier, eps=EPS, eps_step=0.05, max_iter=2, verbose=False)
        return AdversarialTrainerTRADESPyTorch(classifier, attack, beta=6.0), optimizer

    sequential = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with pytest.raises(RuntimeError, match="must match the size"):
        trainer(sequential)[0].fit(x, y, nb_epochs=1, batch_size=32)

    art_trades, optimizer = trainer(build_model("digits", (1, 8, 8), 10))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(ValueError, match="Invalid Pytorch scheduler"):
        art_trades.fit(x, y, nb_epochs=1, batch_size=32, scheduler=scheduler)
    art_trades.fit(x, y, nb_epochs=1, batch_size=32)  # the same trainer, without a scheduler: no error


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_bit_depth_reduction_equals_art_feature_squeezing(bits, digits):
    from art.defences.preprocessor import FeatureSqueezing

    x = torch.cat([digits.x_test[:64], torch.rand(64, 1, 8, 8)])
    expected, _ = FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=bits)(x.numpy())
    assert torch.allclose(quantize(x, bits), torch.from_numpy(expected).float(), atol=1e-6)


@pytest.mark.parametrize(
    "defense_id, art_name, art_kwargs",
    [
        ("art-jpeg-v1", "JpegCompression", {"quality": 50}),
        ("art-spatial-smoothing-v1", "SpatialSmoothing", {"window_size": 2}),
    ],
)
def test_art_wrappers_apply_exactly_arts_preprocessor(defense_id, art_name, art_kwargs, digits):
    import art.defences.preprocessor as preprocessors

    reference = getattr(preprocessors, art_name)(clip_values=(0.0, 1.0), channels_first=True, **art_kwargs)
    x = digits.x_test[:64]
    expected, _ = reference(x.numpy())
    defense = DEFENSES.get(defense_id).make("digits")
    assert torch.equal(defense.preprocess(x), torch.from_numpy(expected))


@pytest.mark.parametrize("shape", [(450, 1, 8, 8), (37, 1, 8, 8), (1, 1, 8, 8), (10, 1, 28, 28), (7, 1, 13, 21)])
def test_jpeg_of_a_mosaic_equals_arts_jpeg_image_by_image(shape, digits):
    """The one-call mosaic (grayscale) gives ART's per-image JPEG pixel for pixel, on real digits and
    on noise, whatever the image size (edges padded as libjpeg pads them) — and it is no identity."""
    from art.defences.preprocessor import JpegCompression

    generator = torch.Generator().manual_seed(0)
    x = digits.x_test[: shape[0]] if shape[2:] == (8, 8) and shape[0] > 1 else torch.rand(shape, generator=generator)
    reference = JpegCompression(clip_values=(0.0, 1.0), quality=50, channels_first=True)
    expected = reference(x.numpy())[0]
    compressed = DEFENSES.get("art-jpeg-v1").make("digits").compress(x.numpy())
    assert np.array_equal(compressed, expected)
    assert np.abs(compressed - x.numpy()).max() > 0.02, "quality 50 must change the images"


def test_colour_images_are_compressed_image_by_image():
    from art.defences.preprocessor import JpegCompression

    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(1)).numpy()
    expected = JpegCompression(clip_values=(0.0, 1.0), quality=75, channels_first=True)(x)[0]
    assert np.array_equal(DEFENSES.get("art-jpeg-v1").make("cifar10").compress(x), expected)
