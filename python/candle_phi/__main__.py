import sys

from candle_phi.cli import main

if __name__ == "__main__":
    sys.exit(main())
