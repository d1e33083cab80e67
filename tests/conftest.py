"""Test setup: run the Triton kernels through Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, so it is set
here, before any test module imports ``lego_kernels``. On a machine with a GPU,
set ``LEGO_TEST_CUDA=1`` to run the kernels natively instead (the interpreter
is then left off and the CUDA tests run).
"""

import os

if os.environ.get("LEGO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-v1")
if "LEGO_DATA_DIR" not in os.environ and os.path.isdir(DATA_DIR):
    os.environ["LEGO_DATA_DIR"] = os.path.abspath(DATA_DIR)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
