import sys
from pathlib import Path

# Test helpers (hf_reference, ...) live beside the tests; make them importable as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
