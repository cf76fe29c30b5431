"""Fixtures of the training tests (the helpers are in tests/support/training.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One thread, as the subprocess tests use: two threads on a shared 2-core machine spin and crawl.
    A module that trains in process marks itself `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
