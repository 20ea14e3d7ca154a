import sys

from raycls.cli import main

sys.exit(main())
