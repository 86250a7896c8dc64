"""Suite-wide checks.

Every test fails if the decay-attention pass hit an internal error while it ran
(a bug in the analysis is never an acceptable near miss).  Tests that provoke one
on purpose are marked ``@pytest.mark.allow_internal_errors``."""
import logging

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_internal_errors: the test provokes internal errors of the pass on purpose")


class _InternalErrors(logging.Handler):
    """Collects the WARNING records passes.report logs for internal errors (robust
    to tests that call ``counters.clear()``)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        if getattr(record, "leet_internal_error", False):
            self.records.append(record)


@pytest.fixture(autouse=True)
def _fail_on_internal_errors(request):
    from torch._dynamo.utils import counters

    logger = logging.getLogger("leet_compile.passes.report")
    handler = _InternalErrors()
    logger.addHandler(handler)
    before = counters["leet"]["internal_errors"]
    try:
        yield
    finally:
        logger.removeHandler(handler)
    counted = counters["leet"]["internal_errors"] - before
    if (counted > 0 or handler.records) and not request.node.get_closest_marker("allow_internal_errors"):
        msgs = "; ".join(r.getMessage() for r in handler.records[:3])
        pytest.fail(f"the decay-attention pass hit {max(counted, len(handler.records))} internal error(s): {msgs}",
                    pytrace=False)
