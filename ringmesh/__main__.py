import sys

from ringmesh.cli import main

sys.exit(main())
