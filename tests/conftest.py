"""Test-session environment: nothing reaches the Hub, and transformers' remote-code cache is a temporary folder."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RWKV_V7_ON"] = "1"  # the official `rwkv` package reads it at import time
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
