"""Hypothesis profiles, and the background launches of tests/background.py.

Hypothesis: the property tests draw their examples from a fixed seed by default ("repeatable"),
so a CI run and its rerun test the same inputs and a failure is never a coin toss. Explore new
inputs with `pytest --hypothesis-profile=explore` (random seeds, more examples); pin what it
finds with `@example`, as tests/unit/test_compression.py does.

Background launches: a module marked `background` has its launch started niced as soon as the
session has collected it, and its tests moved to the end, where they wait for it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from background import BackgroundLaunch
from hypothesis import settings

LAUNCHES = pytest.StashKey[dict]()

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("repeatable")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "background: the module's launch runs niced from the session's start "
                                       "(tests/background.py); its tests run last")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only selected modules start a launch
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    late = [item for item in items if item.get_closest_marker("background")]
    items[:] = [item for item in items if not item.get_closest_marker("background")] + late
    launches: dict = {}
    if late and not config.option.collectonly:
        root = Path(tempfile.mkdtemp(prefix="codistill-background-"))
        for module in dict.fromkeys(item.module for item in late):
            tmp = root / module.__name__
            cmd, env = module.background_launch(tmp)
            launches[module.__name__] = BackgroundLaunch(cmd, tmp, env)
        launches["_root"] = root
    config.stash[LAUNCHES] = launches


def pytest_sessionfinish(session: pytest.Session) -> None:
    launches = session.config.stash.get(LAUNCHES, {})
    root = launches.pop("_root", None)
    for launch in launches.values():
        launch.stop()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def background_run(request: pytest.FixtureRequest) -> BackgroundLaunch:
    """This module's background launch (started when the session collected it)."""
    return request.config.stash[LAUNCHES][request.module.__name__]
