import sys

from sdtune.cli import main

sys.exit(main())
