"""Models trained on radground's dataset versions (issue 10): ``models.radgrounder``."""
