import pytest

from svd_ray.data.paths import DataUnavailableError, resolve_data_dir


@pytest.fixture(scope="session")
def data_dir():
    """The shared offline data directory; tests that need it skip when it is absent."""
    try:
        return resolve_data_dir()
    except DataUnavailableError as err:
        pytest.skip(str(err))
