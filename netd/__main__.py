import sys

from netd.api.cli import main

sys.exit(main())
