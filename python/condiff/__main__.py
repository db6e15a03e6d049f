from condiff.cli import main

raise SystemExit(main())
