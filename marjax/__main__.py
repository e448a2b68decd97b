import sys

from marjax.cli import main

sys.exit(main())
