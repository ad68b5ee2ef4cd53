"""Server fixtures (helpers in serving.py: pytest's conftest modules all share one name)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from candle_phi import Phi3Generator
from candle_phi.server import ServerSettings
from serving import Served, serve


@pytest.fixture(scope="module")
def served(generator: Phi3Generator) -> Iterator[Served]:
    with serve(generator) as s:
        yield s


@pytest.fixture(scope="module")
def served_slow(slow_generator: Phi3Generator) -> Iterator[Served]:
    """A model slow enough that a request is still running when the test acts on it."""
    with serve(slow_generator, ServerSettings(model_name="slow", max_concurrency=4)) as s:
        yield s
