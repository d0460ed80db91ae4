# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Suite-wide pytest options and the fixtures many modules share.

``--shuffle SEED`` runs the tests of each module in a random order (modules keep theirs, so module-scoped servers
start once): a test that only passes after another one has changed the server or the datastore shows up.

Shared fixtures: ``single_thread`` (module scope; opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``)
and ``seeded`` (torch's global seed set to 0 before the test).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="run the tests of each module in a random order drawn from SEED",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("shuffle")
    if seed is None:
        return
    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    shuffled = []
    for group in modules.values():
        rng.shuffle(group)
        shuffled += group
    items[:] = shuffled


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("shuffle")
    return None if seed is None else f"test order shuffled within each module (--shuffle {seed})"


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op torch thread for the module, restored afterwards. The tensors of the network tests are small: two
    OpenMP threads on a shared, loaded 2-core machine spin against each other, and hand-off costs dominate."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def seeded() -> None:
    """torch's global random generator seeded with 0, so a test's random inputs and initial weights are the same on
    every run and in every order (``--shuffle``)."""
    torch.manual_seed(0)
