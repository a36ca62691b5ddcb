"""An autouse fixture that runs a test module with ONE torch intra-op thread, then restores it.

On the shared 2-core test machine, while other processes keep the cores busy, torch's default
intra-op thread pool stalls: the store/tier tests ran 110 s with the default threads and 8 s with
one. Import it into a test module with ``from single_thread import one_torch_thread  # noqa: F401``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
