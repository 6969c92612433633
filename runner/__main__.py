from runner.console import main

raise SystemExit(main())
