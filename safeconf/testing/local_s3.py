"""A local S3 (moto's server) on loopback, for runs whose directory is s3:// without a cloud: every stage then reads
and writes through the object store (Ray Data's Parquet, Ray Train's checkpoints, the adapter) as on a cluster.

moto runs in its own process: imported into a process that later builds a vLLM engine, its flask proxies would sit
in sys.modules, where vLLM's kernel registration calls hasattr on them and fails ("Working outside of application
context").
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

BUCKET = "safeconf-test"


@contextlib.contextmanager
def local_s3(log_dir: str | Path, bucket: str = BUCKET) -> Iterator[str]:
    """Start the server, create `bucket`, set AWS_* in os.environ (so pyarrow here, and every process started from
    here, e.g. a Ray node, reach it) and yield "s3://<bucket>"; restore the environment and stop it on exit."""
    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(Path(log_dir) / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    saved = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}; see {log.name}")
                time.sleep(0.2)
        settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(bucket)
        yield f"s3://{bucket}"
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.terminate()
        server.wait(timeout=30)
        log.close()
