"""``immunoode sweep`` and ``immunoode report`` (being written)."""


def add_sweep_commands(sub):
    """Register ``immunoode sweep`` / ``report`` (placeholder until the sweep module lands)."""
    return None
