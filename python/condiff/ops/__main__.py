import sys

from condiff.ops.info import main

raise SystemExit(main(sys.argv[1:]))
