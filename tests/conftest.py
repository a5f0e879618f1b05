import numpy as np
import pytest


def _gpu_available() -> bool:
    try:
        from nnc.runtime import gpu_available
        return gpu_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cubin_cache(tmp_path_factory):
    """One cubin cache for the whole run (nnc.codegen.cuda): tests never read or write the user's
    ~/.cache, and the many compiles of the same kernels across tests hit it. NNC_STRICT_PRELUDE:
    every kernel compiled by a test compiles with only the prelude pieces codegen/units.py picked."""
    import os
    old = {k: os.environ.get(k) for k in ("NNC_CACHE_DIR", "NNC_STRICT_PRELUDE")}
    os.environ["NNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("nnc_cache"))
    os.environ["NNC_STRICT_PRELUDE"] = "1"
    yield os.environ["NNC_CACHE_DIR"]
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def rng():
    return np.random.default_rng()
