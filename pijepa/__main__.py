import sys

from pijepa.cli import main

sys.exit(main())
