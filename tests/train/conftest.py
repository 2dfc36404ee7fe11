import pytest
import torch
from train_fixtures import *  # noqa: F403


@pytest.fixture(autouse=True)
def _restore_threads():
    """Training sets torch's thread count (TrainConfig.threads); give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
