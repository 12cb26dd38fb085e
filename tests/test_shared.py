"""The layout of the three method files and of common.py. What the method files share is one marked
region (batched augmentation kernels, backbone, gather), byte for byte, and the generic flags, which
they inherit from common.RunArgs. Everything else in a method file is the method, its flags and its
loop, so `diff deepfusion.py bam.py` reads as the difference between the two methods."""

import dataclasses
import importlib
import os
import re

import pytest

import common
from conftest import METHODS, ROOT

BEGIN, END = "shared region: BEGIN", "shared region: END"


def shared_region(text):
    """The marked region of a method file's text."""
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    return text[text.index(BEGIN):text.index(END)]


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


@pytest.mark.parametrize("script", [s for s in METHODS if s != "deepfusion.py"])
def test_shared_region_is_identical(script):
    region = shared_region(_read("deepfusion.py"))
    assert region == shared_region(_read(script)), "the shared region differs"
    assert len(region.splitlines()) > 100  # the region really holds the kernels and the backbone


def test_a_one_character_drift_is_caught():
    # as resample_matrix once drifted between the files: one changed expression inside the region
    text = _read("deepfusion.py")
    line = next(l for l in text.splitlines() if "step.clamp_min(1)" in l)
    drifted = text.replace(line, line.replace("clamp_min(1)", "clamp_min(1.0)"))
    assert shared_region(drifted) != shared_region(text)


@pytest.mark.parametrize("script", METHODS)
def test_generic_flags_come_from_common(script):
    mod = importlib.import_module(script[:-3])
    assert issubclass(mod.Args, common.RunArgs)
    text = _read(script)
    for field in dataclasses.fields(common.RunArgs):  # inherited, not written again
        assert not re.search(rf"^    {field.name}:", text, re.M), field.name


@pytest.mark.parametrize("script", METHODS)
def test_method_first_short_lines_and_short_files(script):
    lines = _read(script).splitlines()
    assert len(lines) < 450, len(lines)
    assert not [i + 1 for i, l in enumerate(lines) if len(l) > 100], "lines over 100 characters"
    method = next(i for i, l in enumerate(lines) if "the method:" in l and l.startswith("# ==="))
    assert method < 150, method  # the method starts within the first screens
    begin = next(i for i, l in enumerate(lines) if BEGIN in l)
    assert method < begin  # and before the shared region


def test_common_holds_data_metrics_and_run_helpers_in_that_order():
    text = _read("common.py")
    lines = text.splitlines()
    sections = [l.split()[-1] for l in lines if re.fullmatch(r"# =+ \w+", l)]
    assert sections == ["data", "metrics", "run"], sections
    assert not [i + 1 for i, l in enumerate(lines) if len(l) > 100], "lines over 100 characters"
    for script in METHODS:  # no import circle: common.py knows no method file
        assert not re.search(rf"^\s*(import|from) {script[:-3]}\b", text, re.M), script
