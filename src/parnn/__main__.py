from parnn.cli import main

raise SystemExit(main())
