"""Gradient-masking diagnostics: the signs Carlini et al. (2019) and AutoAttack check for, computed
from a defense's cells and the runner's probes, each with the evidence that triggered it.

Accuracies are fractions. A flag that compares two measurements must clear two bars:

- a minimum point difference (the *_MARGIN constants): a difference too small to matter is no sign
  of masking, however certain;
- significance at ALPHA on the evaluation examples. Two attacks on the same defense and threat model
  ran on the same examples, so they are compared *paired*, per example: of the examples one attack
  broke and the other did not, an exact one-sided McNemar (sign) test asks whether the winner's share
  could be chance if both attacks were equally strong. At 100 examples a 2-point difference is well
  inside the noise (the Wilson interval of 14% is 8%-22%), and 11% vs 14% with 13 vs 10 discordant
  examples (p = 0.34) is no evidence at all; 5% vs 13% with 11 vs 3 (p = 0.03) is.

ALPHA is per comparison: a defense is tested at every threat model, so over a large matrix an
occasional flag at p just under ALPHA is expected by chance; the evidence gives each flag's p-value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.foundation.gradients import gradients_vanish, vanished_count
from leaderboard.metrics import Masks, binomial_tail, mcnemar_one_sided, paired_counts

ALPHA = 0.05
"""Significance level of every comparison (one-sided, exact): a paired McNemar test between two cells,
or a binomial test of a worst case against chance + NEAR_CHANCE_MARGIN."""
SINGLE_STEP_MARGIN = 0.02
"""Single-step beats iterative: a single-step attack at least this far below every iterative one."""
BLACK_BOX_MARGIN = 0.02
"""Black-box, transfer or noise beats every standard gradient attack by more than this."""
EPS_RISE_MARGIN = 0.02
"""An attack's accuracy at a larger eps exceeds its accuracy at a smaller eps by more than this."""
NEAR_CHANCE_MARGIN = 0.15
"""At the largest eps of an Lp norm, the worst case should be within this of chance (1 / classes);
the flag fires when it is significantly (ALPHA) above chance + this margin."""
ADAPTIVE_MARGIN = 0.05
"""An adaptive attack (EOT, BPDA, logit-space; not the cascade) beats every standard gradient attack
at a threat model by more than 5 points: "standard evaluation unreliable"."""
BLACK_BOX = ("score-based", "decision-based", "transfer", "noise")

FLAGS = {
    "single-step-beats-iterative": "a single-step attack beats every iterative one",
    "black-box-beats-white-box": "a black-box, transfer or noise attack beats every standard gradient attack",
    "accuracy-rises-with-eps": "robust accuracy rises with eps",
    "not-near-chance": "the largest eps does not bring accuracy near chance",
    "standard-evaluation-unreliable": "an adaptive attack beats every standard gradient attack by more than 5 points",
    "zero-gradients": "input gradients vanish on a sizeable share of examples",
    "probability-outputs": "outputs look like probabilities",
    "undeclared-randomness": "outputs change between identical forward passes, not declared randomized",
    "clean-near-chance": "clean accuracy is near chance: training failed, robust accuracy means nothing",
    "weaker-than-reference": "the reference evaluation (AutoAttack) broke examples the worst case left robust",
    "certified-but-broken": "an example a verifier certified was broken by an attack: one of the two is wrong",
    "smoothed-vote-disagrees": "the deployed Monte-Carlo vote was broken where the smoothed classifier is certified",
}
"""Stable keys (used in the JSON and by the nightly report) and their one-line meaning."""


def certified_but_broken(
    worst: Mapping[tuple[str, float], Mapping[str, Any]],
    certified: Mapping[tuple[str, float], Mapping[str, Masks]],
    key: str = "certified-but-broken",
) -> Flag | None:
    """Per threat model and verifier: the examples it certified that the worst case counts broken
    (an attack's adversarial point inside this ball, or a smaller one of the same norm). A sound
    verifier of the deployed model and an honest attack can never both be right about one example
    (``certified-but-broken``). A smoothing certificate is for the smoothed classifier g; the
    deployed vote of a few draws approximates it, so there the same evidence is
    ``smoothed-vote-disagrees``: expected now and then, fewer with more draws per prediction."""
    found = []
    for (norm, eps), by_verifier in sorted(certified.items()):
        masks = worst.get((norm, eps), {}).get("masks", {})
        for verifier, per_seed in sorted(by_verifier.items()):
            ids = {s: np.flatnonzero(m & ~masks[s]).tolist() for s, m in per_seed.items() if s in masks}
            ids = {s: i for s, i in ids.items() if i}
            if ids:
                count = sum(len(i) for i in ids.values())
                listed = "; ".join(f"seed {s}: {i[:10]}" for s, i in sorted(ids.items()))
                found.append(f"{verifier} certified {count} examples at {norm} {eps:g} that an attack broke ({listed})")
    if not found:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return Flag(key, found[0] + more)


@dataclass(frozen=True)
class Flag:
    key: str
    evidence: str

    @property
    def title(self) -> str:
        return FLAGS[self.key]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _p(value: float) -> str:
    return f"p = {value:.2g}" if value >= 1e-4 else "p < 1e-4"


def _by_threat(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], list[Mapping[str, Any]]]:
    grouped: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["norm"], row["eps"]), []).append(row)
    return dict(sorted(grouped.items()))


def _cell(row: Mapping[str, Any]) -> tuple[str, str, float]:
    return (row["attack"], row["norm"], row["eps"])


@dataclass(frozen=True)
class Comparison:
    """``winner`` (lower robust accuracy) against ``loser``: whether it clears the margin, and when both
    cells have per-example masks (``paired``) and it does, the paired counts and the one-sided
    p-value. Without masks only the margin applies."""

    winner: Mapping[str, Any]
    loser: Mapping[str, Any]
    only_winner: int | None
    only_loser: int | None
    p: float | None
    clears_margin: bool
    paired: bool

    @property
    def difference(self) -> float:
        return self.loser["robust_accuracy"] - self.winner["robust_accuracy"]

    @property
    def holds(self) -> bool:
        """More than the margin apart and, with masks, significant at ALPHA."""
        if not self.paired:
            return self.clears_margin
        return self.p is not None and self.p < ALPHA

    def evidence(self, winner_label: str, loser_label: str, where: str) -> str:
        text = (
            f"{winner_label} {_pct(self.winner['robust_accuracy'])} vs {loser_label} "
            f"{_pct(self.loser['robust_accuracy'])} at {where}"
        )
        if self.p is None:
            return text
        return (
            f"{text} (paired: {self.only_winner} examples broken only by the first, {self.only_loser} only by "
            f"the second; one-sided {_p(self.p)})"
        )


def compare(
    winner: Mapping[str, Any],
    loser: Mapping[str, Any],
    margin: float,
    masks: Mapping[tuple[str, str, float], Masks] | None,
) -> Comparison:
    """The paired test runs only when the margin is cleared (it is the costlier of the two bars)."""
    clears = loser["robust_accuracy"] - winner["robust_accuracy"] > margin + 1e-12
    paired = masks is not None and _cell(winner) in masks and _cell(loser) in masks
    if not (clears and paired):
        return Comparison(winner, loser, None, None, None, clears, paired)
    only_winner, only_loser = paired_counts(masks[_cell(winner)], masks[_cell(loser)])
    p = mcnemar_one_sided(only_winner, only_loser)
    return Comparison(winner, loser, only_winner, only_loser, p, clears, paired)


def _beats(
    key: str,
    winners: Sequence[Mapping[str, Any]],
    losers: Sequence[Mapping[str, Any]],
    margin: float,
    where: str,
    masks: Mapping[tuple[str, str, float], Masks] | None,
) -> Flag | None:
    """A flag when some winner is more than ``margin`` below *every* loser, significantly (paired, at
    ALPHA) against each; the evidence names the least significant of those comparisons."""
    if not losers:
        return None
    for winner in sorted(winners, key=lambda r: (r["robust_accuracy"], r["attack"])):
        comparisons = []
        for loser in sorted(losers, key=lambda r: (r["robust_accuracy"], r["attack"])):
            comparisons.append(compare(winner, loser, margin, masks))
            if not comparisons[-1].holds:
                break
        else:
            binding = max(comparisons, key=lambda c: (c.p or 0.0, -c.difference))
            return Flag(key, binding.evidence(winner["attack"], binding.loser["attack"], where))
    return None


def _first_per_key(found: list[Flag]) -> list[Flag]:
    """One flag per key; the evidence of the first threat model that raised it, plus a count."""
    out: dict[str, list[Flag]] = {}
    for flag in found:
        out.setdefault(flag.key, []).append(flag)
    result = []
    for key, flags in out.items():
        more = f" (and {len(flags) - 1} more threat model{'s' if len(flags) > 2 else ''})" if len(flags) > 1 else ""
        result.append(Flag(key, flags[0].evidence + more))
    return result


def _zero_gradients(observed: Mapping[str, Any], probe: Mapping[str, tuple[int, int]] | None) -> Flag | None:
    """``probe``: per loss ("ce", "dlr", "zero"), (examples with vanishing gradient, examples probed);
    without it the counts are estimated from the fractions and the number of probed examples."""
    if probe is None:
        probed = int(observed.get("examples", 0))
        probe = {
            loss: (vanished_count(observed.get(field, 0.0), probed), probed)
            for loss, field in (
                ("ce", "vanishing_gradient_ce"),
                ("dlr", "vanishing_gradient_dlr"),
                ("zero", "zero_gradient_ce"),
            )
        }
    fractions = {loss: (k / m if m else 0.0) for loss, (k, m) in probe.items()}
    fires = [loss for loss in ("ce", "dlr") if gradients_vanish(*probe[loss])]
    if not fires:
        return None
    (ce, probed), (dlr, _) = probe["ce"], probe["dlr"]
    return Flag(
        "zero-gradients",
        f"input gradients vanish on {ce} of {probed} probed correctly classified examples ({_pct(fractions['ce'])}) "
        f"with cross-entropy and {dlr} ({_pct(fractions['dlr'])}) with DLR; exactly zero on "
        f"{_pct(fractions.get('zero', 0.0))}",
    )


def masking_flags(
    rows: Sequence[Mapping[str, Any]],
    worst: Mapping[tuple[str, float], Mapping[str, Any]],
    observed: Mapping[str, Any],
    nature: Mapping[str, Any],
    num_classes: int,
    clean: float | None = None,
    masks: Mapping[tuple[str, str, float], Masks] | None = None,
    probe: Mapping[str, tuple[int, int]] | None = None,
) -> list[Flag]:
    """Every diagnostic that fires for one defense, in the order of FLAGS. ``masks``: the per-example
    robust masks of each (attack, norm, eps) cell by seed, for the paired tests (without them only the
    margins apply); ``probe``: see _zero_gradients."""
    found: list[Flag] = []
    if clean is not None and clean <= 1.0 / num_classes + NEAR_CHANCE_MARGIN:
        found.append(Flag("clean-near-chance", f"clean accuracy {_pct(clean)} (chance {_pct(1.0 / num_classes)})"))
    for (norm, eps), group in _by_threat(rows).items():
        where = f"{norm} {eps:g}"
        gradient = [r for r in group if r["family"] == "gradient"]
        single = [r for r in gradient if r.get("steps") == 1]
        iterative = [r for r in gradient if (r.get("steps") or 0) > 1]
        for flag in (
            _beats("single-step-beats-iterative", single, iterative, SINGLE_STEP_MARGIN, where, masks),
            _beats(
                "black-box-beats-white-box",
                [r for r in group if r["family"] in BLACK_BOX],
                gradient,
                BLACK_BOX_MARGIN,
                where,
                masks,
            ),
            _beats(
                "standard-evaluation-unreliable",
                [r for r in group if r["family"] == "adaptive" and not r.get("cascade")],
                gradient,
                ADAPTIVE_MARGIN,
                where,
                masks,
            ),
        ):
            if flag is not None:
                found.append(flag)
    by_attack: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_attack.setdefault((row["attack"], row["norm"]), []).append(row)
    for (attack, norm), series in sorted(by_attack.items()):
        series = sorted(series, key=lambda r: r["eps"])
        for smaller, larger in zip(series, series[1:], strict=False):
            rise = compare(smaller, larger, EPS_RISE_MARGIN, masks)
            if rise.holds:
                paired = (
                    ""
                    if rise.p is None
                    else f" (paired: {rise.only_winner} examples broken only at the smaller eps, "
                    f"{rise.only_loser} only at the larger; one-sided {_p(rise.p)})"
                )
                found.append(
                    Flag(
                        "accuracy-rises-with-eps",
                        f"{attack}: {_pct(smaller['robust_accuracy'])} at {norm} {smaller['eps']:g} but "
                        f"{_pct(larger['robust_accuracy'])} at {larger['eps']:g}{paired}",
                    )
                )
    chance = 1.0 / num_classes
    for norm in sorted({n for n, _ in worst if n in ("linf", "l2", "l1")}):
        largest = max(eps for n, eps in worst if n == norm)
        estimate = worst[(norm, largest)]["estimate"]
        robust = round(estimate.value * estimate.n)
        p = binomial_tail(robust, estimate.n, chance + NEAR_CHANCE_MARGIN)
        if estimate.value > chance + NEAR_CHANCE_MARGIN and p < ALPHA:
            found.append(
                Flag(
                    "not-near-chance",
                    f"worst case {_pct(estimate.value)} at {norm} {largest:g} (chance {_pct(chance)}; "
                    f"above chance + {100 * NEAR_CHANCE_MARGIN:.0f} points with one-sided {_p(p)})",
                )
            )
    for (norm, eps), entry in sorted(worst.items()):
        reference = entry.get("reference")
        if reference and reference["beyond"]:
            examples = "; ".join(f"seed {s}: {ids[:10]}" for s, ids in reference["beyond_examples"].items())
            found.append(
                Flag(
                    "weaker-than-reference",
                    f"{reference['attack']} {_pct(reference['value'])} vs worst case "
                    f"{_pct(entry['estimate'].value)} at {norm} {eps:g}: {reference['beyond']} examples "
                    f"only it broke ({examples})",
                )
            )
    zero = _zero_gradients(observed, probe)
    if zero is not None:
        found.append(zero)
    if observed.get("probability_like"):
        found.append(Flag("probability-outputs", "outputs lie in [0, 1] and sum to 1"))
    if observed.get("randomized") and not nature.get("randomized"):
        found.append(
            Flag(
                "undeclared-randomness",
                f"identical forward passes differ by up to {observed.get('max_output_difference', 0.0):.3g}",
            )
        )
    order = list(FLAGS)
    return sorted(_first_per_key(found), key=lambda f: order.index(f.key))
