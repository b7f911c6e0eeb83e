"""Shared test setup: tests import their helpers (e.g. `gradcheck`) from this folder."""

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
