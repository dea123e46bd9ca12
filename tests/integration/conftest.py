"""The production stack, started once per session for the tests under tests/integration/."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator

import pytest
from stack import Stack, StackError, missing_prerequisites, new_root


@pytest.fixture(scope="session")
def production_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """PostgreSQL 15, S3 (moto), MLflow + Prefect servers on Postgres, a 2-node Ray cluster and a Prefect
    process worker, started in parallel on 127.0.0.1; stopped afterwards, with nothing left behind."""
    reasons = missing_prerequisites()
    if reasons:
        pytest.skip("the production stack cannot start here: " + "; ".join(reasons))

    def interrupted(signum, frame):  # a killed test run (CI's timeout, `kill`) still tears the stack down
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    stack = Stack(new_root())
    try:
        stack.start()
    except BaseException as exc:
        stack.stop()
        if isinstance(exc, StackError):
            pytest.fail(f"the production stack did not start: {exc}")
        raise
    print(f"\nproduction stack up in {stack.start_seconds} s (per service, ready after: {stack.started_s})")
    try:
        yield stack
    finally:
        stack.stop()
        left = [(p.pid, p.name()) for p in stack.processes()]
        listening = stack.listening_ports()
        if not left and not listening and not request.session.testsfailed:  # else: keep its logs
            shutil.rmtree(stack.root, ignore_errors=True)
        assert not left, f"processes of the stack still running after teardown: {left} (root {stack.root})"
        assert not listening, f"ports of the stack still listening after teardown: {listening}"
