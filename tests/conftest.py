"""Shared fixtures: tiny tokenizers and models built locally (no hub), one torch thread, a fixed seed. The builders they
wrap are in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import build_bpe_tokenizer, build_metaspace_tokenizer  # noqa: E402
from trl_mig.builtin.tiny import build_char_tokenizer, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    return build_metaspace_tokenizer()


@pytest.fixture
def tiny_model(char_tokenizer):
    return build_tiny_model(char_tokenizer).float()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
