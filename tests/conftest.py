import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

# Two threads, or one in each of pytest-xdist's workers (the suite runs as two, pytest.ini): more threads than
# cores make every op of a tiny network wait on a descheduled thread.
THREADS = 1 if 'PYTEST_XDIST_WORKER' in os.environ else 2

@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield
