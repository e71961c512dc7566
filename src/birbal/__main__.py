from birbal.cli import main

raise SystemExit(main())
