from placer.cli.main import main

raise SystemExit(main())
