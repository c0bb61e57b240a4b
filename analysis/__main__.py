"""``python -m analysis results/<config>``: summary.csv and every figure from existing results."""

import sys

from analysis import main

sys.exit(main())
