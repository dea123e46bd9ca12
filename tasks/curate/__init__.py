"""Curate reports: sentences, anatomical keywords, translation, VQA (see tasks/curate/base.py)."""
