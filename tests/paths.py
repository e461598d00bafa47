"""Where the repository is, for tests that read its files or start its scripts: the one place that knows the
test tree's depth (tests/<package folder>/test_*.py), so moving a test file never changes what it finds."""

import os
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = Path(REPO)
