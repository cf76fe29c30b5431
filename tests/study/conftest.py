"""One end-to-end run of the smoke study, shared by the study tests (it takes a while on a busy CPU)."""

from __future__ import annotations

import io

import pytest

from loopcoder.study import Study, get_preset
from support.data import make_corpus


@pytest.fixture(scope="session")
def study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    corpus = make_corpus(tmp / "corpus")
    preset = get_preset("smoke", source=str(corpus))
    log = io.StringIO()
    report = Study(preset, tmp / "study", log=log).run()
    return preset, tmp / "study", report, log.getvalue()
