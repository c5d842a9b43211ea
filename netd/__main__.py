import sys

from netd.cli import main

sys.exit(main())
