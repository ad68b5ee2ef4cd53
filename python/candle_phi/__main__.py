import sys

from candle_phi.cli import main

sys.exit(main())
