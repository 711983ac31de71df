"""Tests import this checkout's sources, even when another checkout is pip-installed in editable mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))
