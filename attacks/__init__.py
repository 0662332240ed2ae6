"""Attacks: one per module, each registered next to its code with ``@register_attack``."""
