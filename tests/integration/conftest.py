import gc

import pytest

from .cluster import close_raw_clients


@pytest.fixture(autouse=True)
async def _close_raw_clients():
    yield
    await close_raw_clients()
    gc.collect()  # so a leaked transport warns in the test that leaked it
