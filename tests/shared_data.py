"""Paths into ../shared/data (real data and weights); tests skip with a message when absent."""

import os

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def path(*parts: str) -> str:
    """Absolute path of a file under ../shared/data, or skip the test saying what is missing."""
    p = os.path.join(ROOT, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not found: {p} (see shared/data/README.md)")
    return p
