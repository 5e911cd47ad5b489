from dispatcher.tools.cli import main

raise SystemExit(main())
