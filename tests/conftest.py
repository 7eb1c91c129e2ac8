import os
import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory):
    """s3://safeconf-test on a local S3 (moto) on loopback; yields the bucket URI. The AWS_* variables it sets
    point pyarrow (and every process started from this one, e.g. a Ray head) at it. moto runs in its own process:
    imported here, its flask proxies would sit in sys.modules, where vLLM's kernel registration calls hasattr on
    them and fails ("Working outside of application context") for every vLLM engine built afterwards."""
    import pyarrow.fs as pafs

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start on port {port}; see {log.name}")
            time.sleep(0.2)
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    server.terminate()
    server.wait(timeout=30)
    log.close()
