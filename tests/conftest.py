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


S3_BUCKET = "safeconf-test"


@pytest.fixture(scope="session")
def local_s3():
    """s3://safeconf-test on a local S3 (moto) on loopback; yields the bucket URI. The AWS_* variables it sets
    point pyarrow (and every process started from this one, e.g. a Ray head) at it."""
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir(S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    server.stop()
