"""Hypothesis profiles, and the background launches of tests/background.py.

Hypothesis: the property tests draw their examples from a fixed seed by default ("repeatable"),
so a CI run and its rerun test the same inputs and a failure is never a coin toss. Explore new
inputs with `pytest --hypothesis-profile=explore` (random seeds, more examples); pin what it
finds with `@example`, as tests/unit/test_compression.py does.

Background launches: a module marked `background` has its launch started niced as soon as the
session has collected it, and its tests moved to the end, where they wait for it; modules that
read one launch name it alike (`pytest.mark.background("quality_smoke")`): it starts once. Tests
marked `quiet` (runs that race Lighthouse heartbeats and joins of a second) come after those,
when no background launch is left running.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from background import BackgroundLaunch
from hypothesis import settings

LAUNCHES = pytest.StashKey[dict]()
LAUNCH_ROOT = pytest.StashKey[Path]()

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("repeatable")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "background: the module's launch runs niced from the session's start "
                                       "(tests/background.py); its tests run last")
    config.addinivalue_line("markers", "quiet: timing-sensitive (torchft heartbeats and quorums of 1 s): runs "
                                       "after the background launches' tests, when none of them is still running")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only selected modules start a launch
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    late = [item for item in items if item.get_closest_marker("background")]
    quiet = [item for item in items if item.get_closest_marker("quiet")]
    items[:] = [item for item in items if not (item.get_closest_marker("background") or item.get_closest_marker("quiet"))]
    items += late + quiet
    launches: dict = {}
    if late and not config.option.collectonly:
        root = Path(tempfile.mkdtemp(prefix="codistill-background-"))
        for item in late:
            key = launch_key(item.get_closest_marker("background"), item.module)
            if key not in launches:
                cmd, env = item.module.background_launch(root / key)
                launches[key] = BackgroundLaunch(cmd, root / key, env)
        config.stash[LAUNCH_ROOT] = root
    config.stash[LAUNCHES] = launches


def pytest_sessionfinish(session: pytest.Session) -> None:
    launches = session.config.stash.get(LAUNCHES, {})
    root = session.config.stash.get(LAUNCH_ROOT, None)
    for launch in launches.values():
        launch.stop()
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def launch_key(marker: pytest.Mark, module) -> str:
    return marker.args[0] if marker.args else module.__name__


@pytest.fixture(scope="module")
def background_run(request: pytest.FixtureRequest) -> BackgroundLaunch:
    """This module's background launch (started when the session collected it)."""
    key = launch_key(request.node.get_closest_marker("background"), request.module)
    return request.config.stash[LAUNCHES][key]
