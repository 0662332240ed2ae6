"""Verifiers: per-example certificates that no perturbation in a threat model changes a prediction."""
