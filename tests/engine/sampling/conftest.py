"""Sampling tests run on tiny tensors: one intra-op thread avoids OpenMP start-up costs that
dominate such ops (tens of ms per op on a loaded machine). Restored after the package."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
