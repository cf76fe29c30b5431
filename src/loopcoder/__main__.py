import sys

from loopcoder.cli import main

sys.exit(main())
