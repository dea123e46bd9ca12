"""pytest plugin for scripts/mutate.py: leave out the tests whose fixtures build a synthetic drop.

mutmut runs each mutant's tests in a fresh pytest session, so a module-scoped fixture that generates
and ingests a synthetic drop (10-60 s on 2 cores) is rebuilt for every mutant it reaches. Those tests are
end-to-end checks of the module (the flow tests cover the same ground); mutation testing uses the unit
tests. The fixture names come from RADGROUND_MUTATE_SKIP_FIXTURES (comma-separated); every deselected
test is reported by pytest's own "deselected" count.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    heavy = {name for name in os.environ.get("RADGROUND_MUTATE_SKIP_FIXTURES", "").split(",") if name}
    if not heavy:
        return
    keep, drop = [], []
    for item in items:
        (drop if heavy & set(getattr(item, "fixturenames", ())) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
