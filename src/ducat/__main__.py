import sys

from ducat.cli import main

sys.exit(main())
