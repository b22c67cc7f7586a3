"""diffusers' scheduler tests (dummy-model tests of the schedulers diffsampler has drop-ins for), vendored from
huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 (Apache-2.0, https://github.com/huggingface/diffusers), whose scheduler sources equal
those of the diffusers 0.42.1 release for these classes (the 0.42.1 sdist ships no tests/schedulers).

schedulers/*.py are the upstream files unchanged below a license and source note; testing_utils.py and
others/test_utils.py hold the few upstream helpers they import. conftest.py collects them only for
tests/test_diffusers_suite.py, which runs them on diffusers' classes and on the drop-ins.
"""
