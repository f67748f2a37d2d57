import os

import pytest
import torch

# Under pytest-xdist each worker gets one thread, so two workers don't fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
