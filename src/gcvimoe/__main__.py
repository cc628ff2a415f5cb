import sys

from gcvimoe.cli import main

sys.exit(main())
