"""Training binaries and their library modules (data, models, recipes)."""
