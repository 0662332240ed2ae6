"""Leaderboard: built from the results database alone (never imports attacks or defenses)."""
