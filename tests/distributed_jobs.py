"""Runs several `gill` command lines one after the other in each worker of one `accelerate launch` job, so that a
test pays for one launch: `accelerate launch ... -m tests.distributed_jobs JOBS.json` (a JSON list of argv lists)."""

import json
import sys

from gill_pipeline.commands import main


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    for argv in jobs:
        code = main(argv)
        if code:
            sys.exit(code)
