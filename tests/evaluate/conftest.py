import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread is much faster than several on a shared machine."""
    yield
