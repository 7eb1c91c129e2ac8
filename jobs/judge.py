"""Batch judging as a job: `safeconf judge` (safeconf.batch_judge) on the cluster this job runs on.

    ray job submit --working-dir . -- python jobs/judge.py --run s3://BUCKET/runs/RUN \\
        --data s3://BUCKET/logs/ --text-column text --out s3://BUCKET/judged/

The arguments are `safeconf judge`'s (`python jobs/judge.py --help`). The data, the run and the output must be on
storage every node reaches: the files are read, and the rejects written, by the workers.
"""

from __future__ import annotations

import sys

from safeconf.cli import main

if __name__ == "__main__":
    sys.exit(main(["judge", *sys.argv[1:]]))
