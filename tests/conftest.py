"""Suite-wide pytest options.

``--shuffle SEED`` runs the tests of each module in a random order (modules keep theirs, so module-scoped servers
start once): a test that only passes after another one has changed the server or the datastore shows up.
"""

from __future__ import annotations

import random

import pytest


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
