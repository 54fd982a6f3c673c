"""``immunoode fit`` (being written)."""


def add_fit_command(sub):
    """Register ``immunoode fit`` (placeholder until the calibration module lands)."""
    return None
