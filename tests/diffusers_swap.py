"""pytest plugin choosing the scheduler classes diffusers' own tests run on, loaded with `-p diffusers_swap` (this
directory on the path) and set by DIFFSAMPLER_DIFFUSERS_SUITE: "diffusers" keeps diffusers' classes, "diffsampler"
sets the drop-ins of diffsampler.integrations.diffusers.FUSED as the `diffusers` module's attributes before the
test modules import them. tests/test_diffusers_suite.py runs both.

Plugins load before any conftest, so the installed diffusers is imported here first in both runs: a diffusers
checkout's tests/conftest.py puts its own src/ on sys.path, which must not replace the installed package that the
drop-ins subclass."""

import os
from pathlib import Path

import diffusers

CLASSES = os.environ.get("DIFFSAMPLER_DIFFUSERS_SUITE")
if CLASSES not in ("diffusers", "diffsampler"):
    raise ValueError(f"DIFFSAMPLER_DIFFUSERS_SUITE={CLASSES!r}: expected 'diffusers' or 'diffsampler'")

if CLASSES == "diffsampler":
    from diffsampler.integrations.diffusers import FUSED

    for _name, _cls in FUSED.items():
        setattr(diffusers, _name, _cls)


def pytest_report_header(config):
    return f"scheduler classes: {CLASSES}; diffusers {diffusers.__version__} from {Path(diffusers.__file__).parent}"
