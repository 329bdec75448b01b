"""`python -m gill_pipeline ...` is `gill ...`."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
