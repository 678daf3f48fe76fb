"""Shared fixtures. float64 is switched on per test, never globally."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (``jax.enable_x64`` context)."""
    with jax.enable_x64(True):
        yield
