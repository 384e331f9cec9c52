"""The modules that scheduling, reports and cluster launchers import load no TensorFlow."""
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("module", ["pipeline.runfiles", "pipeline.cluster", "pipeline.index", "pipeline.locks"])
def test_importing_imports_no_tensorflow(module):
    probe = f"import sys\nimport {module}\nassert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
