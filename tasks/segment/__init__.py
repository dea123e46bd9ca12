"""Segment series into label masks of the merged 121-class space (see tasks/segment/base.py)."""
