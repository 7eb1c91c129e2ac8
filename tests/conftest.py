import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAFECONF_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a skip naming what is missing (a fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present: {path} (set SAFECONF_SHARED_DATA to the data folder)")
    return path


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    """A private local Ray for the session: its own temp dir, fresh ports (Ray picks free ones for a new local
    instance), never attached to another Ray on the machine."""
    import ray

    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        address="local",
        num_cpus=4,  # engine actors (1 CPU each) and Ray Data tasks must fit together on 2 real cores
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
