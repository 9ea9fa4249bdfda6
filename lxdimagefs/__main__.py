import sys

from lxdimagefs.mount.cli import main

sys.exit(main())
