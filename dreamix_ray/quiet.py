"""Silence library chatter (weight-loading bars, hub warnings) that drowns a command's or an actor's own output."""

from __future__ import annotations

import logging
import os

from diffusers.utils import logging as df_logging
from transformers.utils import logging as hf_logging


def quiet_libraries() -> None:
    """Offline hub, no advisory warnings, no per-load progress bars (every Ray actor would print them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    df_logging.set_verbosity_error()
    df_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
