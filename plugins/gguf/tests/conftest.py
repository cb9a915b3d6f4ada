from __future__ import annotations

import sys
from pathlib import Path

# flux_files.py sits beside the tests; pytest's rootdir-relative imports do not reach it from elsewhere.
sys.path.insert(0, str(Path(__file__).parent))
