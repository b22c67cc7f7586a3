# Copyright 2026 HuggingFace Inc.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# The names tests/schedulers imports from huggingface/diffusers tests/others/test_utils.py. The hub tests they
# serve are staging tests, which upstream skips unless HUGGINGFACE_CO_STAGING is set; here they are always
# skipped (no hub is reachable), and the staging token is not copied.
import pytest


USER = "__DUMMY_TRANSFORMERS_USER__"
TOKEN = None


def is_staging_test(test_case):
    """Decorator marking a test as a staging test (one that needs the huggingface.co staging hub): skipped."""
    return pytest.mark.skip("test is staging test")(test_case)
