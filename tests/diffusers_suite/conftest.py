"""Collects diffusers' vendored scheduler tests only when DIFFSAMPLER_DIFFUSERS_SUITE names the classes to test:
"diffusers" (diffusers' own) or "diffsampler" (the drop-ins of diffsampler.integrations.diffusers, set as the
`diffusers` module's attributes before the test modules import them). tests/test_diffusers_suite.py runs both."""

import os

SUITE = os.environ.get("DIFFSAMPLER_DIFFUSERS_SUITE")
if SUITE not in (None, "diffusers", "diffsampler"):
    raise ValueError(f"DIFFSAMPLER_DIFFUSERS_SUITE={SUITE!r}: expected 'diffusers' or 'diffsampler'")
collect_ignore_glob = [] if SUITE else ["*"]

if SUITE == "diffsampler":
    import diffusers

    from diffsampler.integrations.diffusers import FUSED

    for _name, _cls in FUSED.items():
        setattr(diffusers, _name, _cls)


def pytest_report_header(config):
    return f"scheduler classes: {SUITE}"
