import sys

from svdkit.cli import main

sys.exit(main())
