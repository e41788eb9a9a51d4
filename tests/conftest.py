import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # multi-process tests start their own process groups; keep threads low on 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
