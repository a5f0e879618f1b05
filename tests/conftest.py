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
    ~/.cache, and the many compiles of the same kernels across tests hit it."""
    import os
    old = os.environ.get("NNC_CACHE_DIR")
    os.environ["NNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("nnc_cache"))
    yield os.environ["NNC_CACHE_DIR"]
    if old is None:
        os.environ.pop("NNC_CACHE_DIR", None)
    else:
        os.environ["NNC_CACHE_DIR"] = old


@pytest.fixture
def rng():
    return np.random.default_rng()
