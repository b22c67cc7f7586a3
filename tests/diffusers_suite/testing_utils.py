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
# The two names tests/schedulers imports from huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 tests/testing_utils.py:
# CaptureLogger (its docstring example left out); torch_device keeps its DIFFUSERS_TEST_DEVICE override and its cuda / cpu choice.
import logging
import os
from io import StringIO

import torch


if "DIFFUSERS_TEST_DEVICE" in os.environ:
    torch_device = os.environ["DIFFUSERS_TEST_DEVICE"]
else:
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"


class CaptureLogger:
    """
    Args:
    Context manager to capture `logging` streams
        logger: 'logging` logger object
    Returns:
        The captured output is available via `self.out`
    """

    def __init__(self, logger):
        self.logger = logger
        self.io = StringIO()
        self.sh = logging.StreamHandler(self.io)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.sh)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.sh)
        self.out = self.io.getvalue()

    def __repr__(self):
        return f"captured: {self.out}\n"
